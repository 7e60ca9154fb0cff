"""Stage entry points: one module per DVC stage (and the command `embed`).

Each module has one `run(p: Params, *, ...) -> dict`: it reads its own section of the params
(plus the few keys of other sections that dvc.yaml lists for the stage), takes its paths from
`ptum.paths` (overridable by keyword, as `ptum STAGE --input/--out` do) and calls the library
function that does the work. The returned dict is the stage's summary, printed by the CLI.

    params.yaml section -> ptum.stages.STAGE.run -> library function -> files under ptum.paths

`ptum.cli` parses arguments and dispatches here; `errors` is the CLI's error policy, `launch`
the loopback-only launcher of data-parallel pre-training on this machine and `multinode` its
launcher across machines (torch's elastic agent).
"""

"""Serving: ONNX export of a user model and its heads, and torch-free embedding of behavior logs.

    contract.py   input names, static dims and the metadata every exported graph carries
    fold.py       `serving_model`: the trained model with linear maps folded, fused attention
    onnx_io.py    the dynamo exporter, metadata, onnx.checker, graph input dims
    parity.py     random serving-shaped inputs; onnxruntime vs PyTorch check
    heads.py      CTR (dot or bias) and demographic heads as ONNX graphs; the label name check
    training.py   the serving heads, trained for the tasks the prepared data allows
    export.py     stage `export`: every graph of a checkpoint, checked, into one directory
    sequences.py  model inputs from a behavior log (NumPy; no torch)
    artifacts.py  an export directory read for serving, every file checked against export.json
    embed.py      command `embed`: user vectors with onnxruntime, bounded memory (no torch)

This package imports nothing on its own, so `ptum.serving.embed` stays torch-free.
"""

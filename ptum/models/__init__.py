"""PTUM user models: behavior encoders, user encoders and the `UserModel` that joins them."""

from ptum.models.behavior import (
    BEHAVIOR_ENCODERS,
    CnnBehaviorEncoder,
    HybridBehaviorEncoder,
    IdBehaviorEncoder,
    LstmBehaviorEncoder,
    SelfAttnBehaviorEncoder,
)
from ptum.models.layers import NUM_GAP_BUCKETS, time_gap_bucket
from ptum.models.user import (
    USER_ENCODERS,
    Bert4RecUserEncoder,
    Gru4RecUserEncoder,
    HanUserEncoder,
    HsaUserEncoder,
    HuraUserEncoder,
    NativeCtrUserEncoder,
)
from ptum.models.user_model import (
    ARCHITECTURES,
    ModelConfig,
    UserModel,
    build_behavior_encoder,
    build_user_encoder,
)

__all__ = [
    "ARCHITECTURES",
    "BEHAVIOR_ENCODERS",
    "NUM_GAP_BUCKETS",
    "USER_ENCODERS",
    "Bert4RecUserEncoder",
    "CnnBehaviorEncoder",
    "Gru4RecUserEncoder",
    "HanUserEncoder",
    "HsaUserEncoder",
    "HuraUserEncoder",
    "HybridBehaviorEncoder",
    "IdBehaviorEncoder",
    "LstmBehaviorEncoder",
    "ModelConfig",
    "NativeCtrUserEncoder",
    "SelfAttnBehaviorEncoder",
    "UserModel",
    "build_behavior_encoder",
    "build_user_encoder",
    "time_gap_bucket",
]

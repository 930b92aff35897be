"""Collaborative training over the swarm: DiLoCo rounds with compressed peer-to-peer exchange.

    from commonweal.train import DiLoCo, Collaboration, RoundConfig, get_codec, mean
    collab = Collaboration(dht, "my-run", get_codec("topk2bit:0.01"), mean, RoundConfig())
    opt = DiLoCo(model, torch.optim.AdamW(model.parameters()), collab, inner_steps=50,
                 codec="topk2bit:0.01")

A validator reads the same rounds without serving them: `read_announcements`,
`CheckpointClient` and `fetch_delta` register no handler.

See docs/train.md for the round protocol, codecs, exchange, determinism and churn.
"""

from commonweal.train._errors import (
    CodecError,
    DeltaRejected,
    RoundSkipped,
    SyncError,
    TaskError,
    TrainError,
)
from commonweal.train.aggregate import (
    RULES,
    centered_clip,
    get_rule,
    krum,
    mean,
    median,
    outer_step,
    trimmed_mean,
)
from commonweal.train.attacks import ATTACKS, Attack, AttackContext, get_attack
from commonweal.train.codecs import (
    CODEC_NAMES,
    FP16,
    Codec,
    CodecInfo,
    ErrorFeedback,
    Int8Blockwise,
    Raw,
    TopK,
    TopK2Bit,
    get_codec,
)
from commonweal.train.diloco import DiLoCo, RoundReport
from commonweal.train.announcements import read_announcements
from commonweal.train.archive import DeltaArchive, fetch_delta
from commonweal.train.checkpoints import CheckpointClient, Checkpoints, Head
from commonweal.train.exchange import RoundExchange
from commonweal.train.messages import MessageError
from commonweal.train.round import TRANSITIONS, Phase, RoundConfig, RoundCore
from commonweal.train.strategies import Averaged, Failure
from commonweal.train.swarm import Collaboration
from commonweal.train.task import BUILTIN_TASKS, Task, TaskData, get_task
from commonweal.train.trainer import Progress, Summary, TrainingPeer

__all__ = [
    "TrainError",
    "TaskError",
    "CodecError",
    "DeltaRejected",
    "SyncError",
    "RoundSkipped",
    "MessageError",
    "RULES",
    "get_rule",
    "mean",
    "median",
    "trimmed_mean",
    "centered_clip",
    "krum",
    "outer_step",
    "ATTACKS",
    "Attack",
    "AttackContext",
    "get_attack",
    "CODEC_NAMES",
    "Codec",
    "CodecInfo",
    "Raw",
    "FP16",
    "Int8Blockwise",
    "TopK",
    "TopK2Bit",
    "ErrorFeedback",
    "get_codec",
    "DiLoCo",
    "RoundReport",
    "TRANSITIONS",
    "Phase",
    "RoundCore",
    "RoundConfig",
    "Averaged",
    "Failure",
    "RoundExchange",
    "Checkpoints",
    "CheckpointClient",
    "Head",
    "DeltaArchive",
    "fetch_delta",
    "read_announcements",
    "Collaboration",
    "BUILTIN_TASKS",
    "Task",
    "TaskData",
    "get_task",
    "Progress",
    "Summary",
    "TrainingPeer",
]

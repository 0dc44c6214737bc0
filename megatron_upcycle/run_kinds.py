"""The kinds of run, in one vocabulary.

A run's ``kind`` says how it starts; its ``model_kind`` says what its weights
are. A branch of a dense stable run is kind ``branch``, model kind ``dense``.

  dense, moe   from scratch
  upcycle      from a converted MoE checkpoint (fresh optimizer, MoE LR)
  cpt          dense continued pretraining from a dense checkpoint
  branch       the decay of a stable run's checkpoint, in its own directory
  convert      dense checkpoint -> MoE checkpoint (no training)
  eval         downstream evaluation of a final model (lm-evaluation-harness)

The results table and the scaling fits call upcycled models ``upcycled``
(the paper's word); ``FIT_KIND`` is the one place that translates.
"""
from __future__ import annotations

from typing import Literal

TrainKind = Literal["dense", "moe", "upcycle", "branch", "cpt"]
ModelKind = Literal["dense", "moe", "upcycle", "cpt"]
Stage = Literal["stable", "branch", "convert", "full", "eval"]

TRAIN_KINDS: tuple[str, ...] = ("dense", "moe", "upcycle", "branch", "cpt")
RUN_KINDS: tuple[str, ...] = TRAIN_KINDS + ("convert", "eval")
# Kinds that run as one plain process (no torchrun, no srun across nodes).
SINGLE_PROCESS_KINDS = frozenset({"convert", "eval"})
MODEL_KINDS: tuple[str, ...] = ("dense", "moe", "upcycle", "cpt")
MOE_MODEL_KINDS = frozenset({"moe", "upcycle"})
# Kinds that start from a checkpoint named by ``init_from``.
INIT_KINDS = frozenset({"upcycle", "cpt"})

# model kind (result.json) -> kind in results.csv and the fits
FIT_KIND = {"dense": "dense", "moe": "moe", "upcycle": "upcycled", "cpt": "cpt"}

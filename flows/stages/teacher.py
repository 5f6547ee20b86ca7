"""teacher: the backbone's final norm and LM head, stored once per backbone and referenced by
every cache extracted from it (the LM head is most of a small cache: 113 MB of SmolLM2's).

Content key: the model identity (weight hashes or hub commit, dtype, quantization) and the
code version. The extract stage builds it (or finds it) with the backbone it already loaded;
caches written before it existed keep their own ``teacher.safetensors`` and still read.
"""

from __future__ import annotations

from pathlib import Path

from flows.stages.base import Built, Plan, Stage, StageContext
from pipeline.backbone import Backbone, load_backbone, model_identity
from stores.files import save_tensors

TEACHER_FILE = "teacher.safetensors"
TEACHER_CODE_VERSION = "teacher-1"


class TeacherStage(Stage):
    name = "teacher"
    code_version = TEACHER_CODE_VERSION

    def __init__(self, backbone: Backbone | None = None):
        self.backbone = backbone  # the caller's loaded backbone, to avoid a second load; not a parameter

    def plan(self, ctx: StageContext, inputs: dict[str, str]) -> Plan:
        return self.make_plan({"model": model_identity(ctx.cfg.model, ctx.store.file_hasher())}, {},
                              {"source": ctx.cfg.model.source})

    def build(self, ctx: StageContext, plan: Plan, staging: Path) -> Built:
        backbone = self.backbone or load_backbone(ctx.cfg.model, ctx.store.file_hasher())
        teacher = backbone.teacher_weights()
        save_tensors(staging / TEACHER_FILE, *teacher.to_state())
        return Built(metrics={"vocab_size": teacher.vocab_size, "hidden_size": teacher.hidden_size,
                              "norm": teacher.norm_kind})

"""`slmctl pretrain`: a model trained from random weights (or `init=`) on an objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from slmctl.config.model import ModelSchema
from slmctl.config.training import TrainingSchema


@dataclass
class PretrainSchema(TrainingSchema):
    init: Optional[str] = None  # start from this model / run instead of random weights
    model: ModelSchema = field(default_factory=ModelSchema)
    objective: Any = None  # null: the model's arch chooses (PRETRAIN_OBJECTIVE)

"""Learn backprop by writing it: a workspace of layers with their backward passes left
as gaps (`init`), graded by minivgg's own gradient checks (`check`), ending with
VGG-11-BN trained on the learner's layers (`train`). See docs/EXERCISES.md."""
from .generate import EXERCISES, exercise_source, init_workspace
from .grade import check_workspace

__all__ = ["EXERCISES", "exercise_source", "init_workspace", "check_workspace"]

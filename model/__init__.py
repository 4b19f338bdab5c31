"""FLUX model code: the distillation transformer, JVP attention, TrigFlow wrappers, I/O and pipelines."""
from model.notices import silence_unactionable_notices

silence_unactionable_notices()

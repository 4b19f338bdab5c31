"""A procedural text-image world of flat coloured shapes, with GenEval-style captions and a scorer.

``domain`` renders images and captions and builds datasets; ``scorer`` judges images against
GenEval-format metadata without any neural network, so distillation can be checked on CPU.
"""

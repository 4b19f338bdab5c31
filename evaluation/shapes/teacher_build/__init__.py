"""The shapes teacher builder, by responsibility (the entry point and public API: :mod:`evaluation.shapes.teacher`).

``recipes`` (what a build is: :class:`~.recipes.TeacherConfig`, the named recipes, the config key), ``common``
(image/tensor helpers, LR schedule, progress bars), ``optim`` (the resumable AdamW + EMA loop),
``vae``, ``text`` (frozen/trainable text conditioning, caption-parsing pretraining), ``flow`` (flow matching),
``guidance`` (CFG and guidance distillation), ``state`` (state folders, atomic publishing, snapshots),
``scoring`` (sampling + scoring the stored teacher) and ``build`` (the staged build that ties them together).
"""

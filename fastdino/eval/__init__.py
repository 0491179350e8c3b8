"""Evaluation of frozen backbones: weighted kNN (`knn`), linear probe (`linear`), attention pictures (`attention`),
training curves (`plots`). Each is a module with a library API and a `python -m fastdino.eval.<name>` command.

Submodules are not imported here, so that `python -m fastdino.eval.knn` runs its module exactly once.
"""

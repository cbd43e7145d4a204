"""Pretrained model zoos: torchvision weights, timm and Hugging Face transformers.

Each module turns a zoo's own description of a model (weights enum, ``pretrained_cfg``, image
processor) into the model, its class names and its exact :class:`~workers.preprocess.Preprocess`.
timm and transformers are optional extras, imported only when a reference names them.
"""

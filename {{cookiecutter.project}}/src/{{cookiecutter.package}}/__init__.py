"""{{ cookiecutter.project }}: a from-scratch Transformer language model, LoRA fine-tuning and training entry points.

Entry points (run as modules so IDE configurations never depend on the working directory):
``python -m {{ cookiecutter.package }}.pretrain``, ``python -m {{ cookiecutter.package }}.finetune``,
``python -m {{ cookiecutter.package }}.generate``, ``python -m {{ cookiecutter.package }}.bench``.
"""

__version__ = "0.1.0"

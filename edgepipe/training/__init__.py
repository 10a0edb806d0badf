"""Training: the one loop every stage uses (``loop``), knowledge distillation (``distillation``) and torchrun
(``distributed``)."""

"""Attacks and robust evaluation on the fused PGD steps (docs/math.md, docs/attacks.md).

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10)      # torchattacks-like
    x_adv = atk(x, y)
    x_adv = atk(x, y, branch=is_adv)          # routes every multi-branch BN in the model
    x_adv = atk(x, y, eps=per_sample_eps)     # eps = 0 leaves a sample clean
    report = evaluate(model, loader, attack_suite(model))
"""
from .attacks import FGSM, MIFGSM, PGD, Attack, cw_loss
from .evaluate import (accuracy, attack_suite, batches_of, evaluate, robust_accuracy,
                       weighted_robust_accuracy)

__all__ = ["Attack", "PGD", "FGSM", "MIFGSM", "cw_loss", "accuracy", "robust_accuracy",
           "weighted_robust_accuracy", "evaluate", "attack_suite", "batches_of"]

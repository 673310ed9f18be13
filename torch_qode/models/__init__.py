"""Models of the paper's experiments: the CIFAR ResNet family, MLPs with polynomial activations and a
small character-level transformer language model.

Floor 4 (applications): only torch is needed here.
"""
from .mlp import Polynomial, mlp
from .resnet import BasicBlock, CIFARResNet, cifar_resnet, cifar_resnet_num_params
from .transformer import CharTransformer, lm_loss

__all__ = ["cifar_resnet", "cifar_resnet_num_params", "CIFARResNet", "BasicBlock", "mlp", "Polynomial",
           "CharTransformer", "lm_loss"]

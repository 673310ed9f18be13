"""Models of the paper's experiments: the CIFAR ResNet family and MLPs with polynomial activations.

Floor 4 (applications): only torch is needed here.
"""
from .mlp import Polynomial, mlp
from .resnet import BasicBlock, CIFARResNet, cifar_resnet, cifar_resnet_num_params

__all__ = ["cifar_resnet", "cifar_resnet_num_params", "CIFARResNet", "BasicBlock", "mlp", "Polynomial"]

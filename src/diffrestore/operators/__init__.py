"""Degradation operators y = H x (+ noise) with exact, implicitly applied SVDs, and the task registry."""

from .base import DEFAULT_REL_THRESHOLD, ImageSizeError, LinearOperator
from .blur import (
    AnisotropicGaussianBlur,
    GaussianBlur,
    SeparableBlur,
    UniformBlur,
    conv_matrix,
    gaussian_kernel1d,
    uniform_kernel1d,
)
from .colorize import Colorization
from .denoise import Identity
from .inpaint import Inpainting, mask_from_image, random_mask
from .separable import SeparableOperator
from .superres import BicubicSR, BlockAverageSR, bicubic_matrix, block_average_matrix
from .tasks import TASKS, Task, TaskSpec, list_tasks, make_task, register, task_names

__all__ = [
    "DEFAULT_REL_THRESHOLD", "ImageSizeError", "LinearOperator", "SeparableOperator",
    "Identity", "BlockAverageSR", "BicubicSR", "SeparableBlur", "GaussianBlur", "AnisotropicGaussianBlur",
    "UniformBlur", "Inpainting", "Colorization", "random_mask", "mask_from_image", "gaussian_kernel1d", "uniform_kernel1d",
    "conv_matrix", "bicubic_matrix", "block_average_matrix",
    "TASKS", "Task", "TaskSpec", "list_tasks", "task_names", "make_task", "register",
]

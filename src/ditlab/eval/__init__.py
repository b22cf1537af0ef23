"""Evaluation: Inception FID/sFID/IS/precision-recall, MNIST classifier metrics, Gflops, scaling fits."""

from ditlab.eval.classifier import class_accuracy, load_classifier

__all__ = ["class_accuracy", "load_classifier"]

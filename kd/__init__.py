"""kd: self-supervised ResNet50 teacher distilled into a ResNet18 student for pediatric chest X-rays."""

__version__ = "0.1.0"

"""Image recognition: a small Keras 3 ResNet trained on the shared Horovod core's Keras engine."""

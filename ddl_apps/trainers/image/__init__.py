"""Image recognition: a small Keras 3 ResNet trained with model.fit on the shared Horovod core."""

"""Networks of the zoo: F-net (2D/3D), DenseNet-121 U-Net (2D), 3D U-Net."""

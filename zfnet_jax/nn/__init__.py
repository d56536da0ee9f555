"""The networks: layers with the deconvnet's rules (``layers``), the layer table
(``geometry``), ZFNet, AlexNet and their variants (``models``), torchvision's layouts
(``torchvision``) and their weights (``convert``)."""

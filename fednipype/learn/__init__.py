"""Federated learning on regional features: models, FedAvg, the DP-SGD accountant, model files.

This layer is shared by sites and hub: it imports only :mod:`fednipype.exceptions`,
:mod:`fednipype.io` and numerical libraries (numpy, pandas, scikit-learn, scipy,
dp-accounting), never a site's data readers, the noise sampler or Flower.
"""

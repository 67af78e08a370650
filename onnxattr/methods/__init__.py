"""The methods layer: the method table (table), integration rules (integration), Grad-CAM
(cam), occlusion (occlusion), compiled attribution models (compile), figures (figures) and the
Explainer that runs a method on images (explainer, the public API). It imports graph and io."""

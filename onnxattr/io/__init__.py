"""The input/output layer, the lowest: model loading and checks (model), images (image),
Caffe weights (caffe), maps as pictures (render), atomic files and the folder lock (files).
It imports no other layer."""

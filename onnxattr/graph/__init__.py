"""The graph layer: the ONNX toolkit (toolkit), preparation of the forward graph (prepare), the
ReLU rules (relu_rules), both gradient builders (autodiff/, training, with the training ops'
lowering and the backward forms), the graph cache (builders), onnxruntime sessions (runtime),
the engine that runs them (engine), Grad-CAM's layers (layers) and weight randomization
(randomize). It imports io only."""

"""A ViT-like test model: token sequences [N, 1 + h*w, C] (a class token first), no feature map
on the image's grid, so Grad-CAM reads a layer through its token grid."""

import onnx
import torch

SIZE = (16, 12)  # the image (H, W); patches of 4: a 4 x 3 grid of tokens
PATCH, DIM, CLASSES = 4, 8, 5


class TinyViT(torch.nn.Module):
    """Patch embedding, a class token, position embeddings, one pre-norm block (single-head
    attention, MLP), the class token's LayerNorm -> Linear head, Softmax."""

    def __init__(self):
        super().__init__()
        tokens = 1 + (SIZE[0] // PATCH) * (SIZE[1] // PATCH)
        self.embed = torch.nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, DIM))
        self.position = torch.nn.Parameter(torch.randn(1, tokens, DIM) * 0.5)
        self.norm1 = torch.nn.LayerNorm(DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.norm2 = torch.nn.LayerNorm(DIM)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 2 * DIM), torch.nn.GELU(),
                                       torch.nn.Linear(2 * DIM, DIM))
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, CLASSES)
        torch.nn.init.normal_(self.head.weight, std=2.0)  # confident enough to be non-uniform

    def logits(self, image):
        x = self.embed(image / 255.0).flatten(2).transpose(1, 2)  # [N, h*w, C], row by row
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(1, 2) / DIM ** 0.5, dim=-1) @ v
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])

    def forward(self, image):
        return torch.softmax(self.logits(image), dim=1)


def export_tiny_vit(path, seed=0):
    """A seeded TinyViT exported to ONNX at `path` (image [N, 3, 16, 12], output prob; opset
    17); returns (the torch module, the ONNX name of norm1's output: its token sequence)."""
    torch.manual_seed(seed)
    net = TinyViT().eval()
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(net, (torch.zeros(1, 3, *SIZE),), str(path), input_names=["image"],
                      output_names=["prob"], dynamic_axes={"image": {0: "N"}, "prob": {0: "N"}},
                      opset_version=17, **kwargs)
    model = onnx.load(path)
    model.ir_version = 8
    onnx.save(model, path)
    norm1 = next(node.output[0] for node in model.graph.node if "norm1" in node.name)
    return net, norm1

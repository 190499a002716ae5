"""DeepLab v2 in PyTorch, written from its description (docs/algorithm.md; ADVENT's layout in
../shared/notes/peers.md), for tests/weights.rs: it saves random weights in the layouts people
download (torchvision's ResNet, DeepLab's Caffe-converted ResNet, ADVENT's whole DeepLab v2),
runs the network on one input and saves what it computed, so that adamcu's network can be
checked against it with the same weights.

usage: deeplabv2.py OUT_DIR --style caffe|torchvision --blocks 3,4,23,3 --classes 19
                    [--sgd-steps K --iterations T --lr --momentum --weight-decay --head-lr-mult
                     --aux-weight --poly-power]
writes OUT_DIR/imagenet.pth (backbone only, in the style's download layout),
       OUT_DIR/deeplabv2.pth (the whole network, ADVENT's names: layer5 = classifier on layer3,
                              layer6 = classifier on layer4),
       OUT_DIR/outputs.pth   ({"input", "aux", "main"}: logits at stride 8, eval mode),
and with --sgd-steps K, K steps of the supervised stage (Section IV-B) with torch.optim.SGD
on one batch: OUT_DIR/sgd.pth ({"images", "labels", "losses"}) and OUT_DIR/trained.pth (the
network after them, ADVENT's names).
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, width, stride, dilation, caffe):
        super().__init__()
        # Caffe puts the stride on the first 1x1 conv, torchvision on the 3x3.
        s1, s2 = (stride, 1) if caffe else (1, stride)
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, s2, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Classifier(nn.Module):
    """The sum of four dilated 3x3 convolutions."""

    def __init__(self, c_in, classes, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(c_in, classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            conv.weight.data.normal_(0, 0.01)

    def forward(self, x):
        return sum(conv(x) for conv in self.conv2d_list)


class DeepLabV2(nn.Module):
    def __init__(self, blocks, classes, caffe):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=caffe)
        c_in = 64
        # Output stride 8: layer3 and layer4 keep the resolution and dilate instead.
        for i, (n, width, stride, dilation) in enumerate(zip(blocks, (64, 128, 256, 512), (1, 2, 1, 1), (1, 1, 2, 4))):
            layer = []
            for b in range(n):
                layer.append(Bottleneck(c_in, width, stride if b == 0 else 1, dilation, caffe))
                c_in = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.layer5 = Classifier(1024, classes)
        self.layer6 = Classifier(2048, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x3 = self.layer3(x)
        return self.layer5(x3), self.layer6(self.layer4(x3))


def randomise_batchnorm(model, generator):
    """Stored statistics and affine parameters away from 0/1, so that a mix-up shows."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=generator) * 0.5 + 0.5
            m.bias.data = torch.randn(c, generator=generator) * 0.1
            m.running_mean = torch.randn(c, generator=generator) * 0.1
            m.running_var = torch.rand(c, generator=generator) + 0.5


def sgd_steps(model, args, generator):
    """The supervised stage's step: cross-entropy (255 ignored) of the logits upsampled to the
    labels, main + aux_weight x aux; BatchNorm frozen (stored statistics, affine fixed); SGD
    with the classifiers at head_lr_mult x the learning rate, poly decay."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    heads = [p for n, p in model.named_parameters() if n.startswith(("layer5.", "layer6.")) and p.requires_grad]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(("layer5.", "layer6.")) and p.requires_grad]
    optimizer = torch.optim.SGD([{"params": backbone, "lr_mult": 1.0}, {"params": heads, "lr_mult": args.head_lr_mult}],
                                lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    labels = torch.randint(0, args.classes, (2, 64, 96), generator=generator)
    labels[torch.rand(2, 64, 96, generator=generator) < 0.2] = 255
    losses = []
    for step in range(args.sgd_steps):
        lr = args.lr * (1 - step / args.iterations) ** args.poly_power
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        aux, main_logits = model(images)
        up = lambda logits: F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(up(main_logits), labels, ignore_index=255) \
            + args.aux_weight * F.cross_entropy(up(aux), labels, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    torch.save({"images": images, "labels": labels, "losses": torch.tensor(losses, dtype=torch.float64)},
               os.path.join(args.out, "sgd.pth"))
    torch.save(model.state_dict(), os.path.join(args.out, "trained.pth"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--style", choices=["caffe", "torchvision"], required=True)
    parser.add_argument("--blocks", default="3,4,23,3")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--sgd-steps", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=1)
    for name in ("--lr", "--momentum", "--weight-decay", "--head-lr-mult", "--aux-weight", "--poly-power"):
        parser.add_argument(name, type=float)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    caffe = args.style == "caffe"
    model = DeepLabV2([int(b) for b in args.blocks.split(",")], args.classes, caffe).eval()
    randomise_batchnorm(model, generator)
    state = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith(("layer5.", "layer6."))}
    if caffe:
        # As the 2017 download: every key under "Scale.", a classifier of its own in layer5
        # (for another label set), torch's legacy (pre-1.6) container.
        imagenet = {f"Scale.{k}": v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
        imagenet.update({f"Scale.layer5.{k}": v for k, v in Classifier(1024, 21).state_dict().items()})
        torch.save(imagenet, os.path.join(args.out, "imagenet.pth"), _use_new_zipfile_serialization=False)
    else:
        imagenet = dict(backbone, **{"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
        torch.save(imagenet, os.path.join(args.out, "imagenet.pth"))
    torch.save(state, os.path.join(args.out, "deeplabv2.pth"))
    x = torch.randn(1, 3, 64, 96, generator=generator)  # even sizes: ceil- and floor-mode pools differ
    with torch.no_grad():
        aux, main_logits = model(x)
    torch.save({"input": x, "aux": aux, "main": main_logits}, os.path.join(args.out, "outputs.pth"))
    if args.sgd_steps:
        sgd_steps(model, args, generator)


if __name__ == "__main__":
    main()

"""CycleGAN's networks in PyTorch for the parity test (tests/translate.rs), built as Zhu et al.
(2017) publish them: the ResNet generator (reflection padding, instance norm without affine
parameters, 2 stride-2 convolutions down and 2 transposed ones up, tanh) and the PatchGAN
discriminator (4x4 convolutions, leaky ReLU 0.2, instance norm). The modules are listed in the
order of the reference implementation, so the state_dict keys (`model.<index>.weight`) are the
ones its checkpoints hold. Writes to OUT: generator.pth, discriminator.pth (random weights),
outputs.pth (inputs, outputs) and adam.pth (the generator after two Adam steps).

usage: cyclegan.py OUT [--ngf 8] [--blocks 2] [--ndf 8] [--layers 3]
"""
import argparse
import os

import torch
from torch import nn


def generator(ngf, blocks):
    def residual(c):
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv_block = nn.Sequential(
                    nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3, bias=True), nn.InstanceNorm2d(c), nn.ReLU(True),
                    nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3, bias=True), nn.InstanceNorm2d(c))

            def forward(self, x):
                return x + self.conv_block(x)
        return Block()

    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=True), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for i in range(2):
        c = ngf * 2 ** i
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=True), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
    layers += [residual(4 * ngf) for _ in range(blocks)]
    for i in range(2):
        c = 4 * ngf // 2 ** i
        layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                   nn.InstanceNorm2d(c // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            return self.model(x)
    return Generator()


def discriminator(ndf, n_layers):
    layers = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        stride = 2 if n < n_layers else 1
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=True),
                   nn.InstanceNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            return self.model(x)
    return Discriminator()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--ngf", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--ndf", type=int, default=8)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    g, d = generator(args.ngf, args.blocks), discriminator(args.ndf, args.layers)
    for m in list(g.modules()) + list(d.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.normal_(m.bias, 0.0, 0.02)  # non-zero, so a bias left out would show
    torch.save(g.state_dict(), os.path.join(args.out, "generator.pth"))
    torch.save(d.state_dict(), os.path.join(args.out, "discriminator.pth"))
    x = torch.rand(2, 3, 36, 52) * 2 - 1
    with torch.no_grad():
        torch.save({"input": x, "generated": g(x), "scores": d(x)}, os.path.join(args.out, "outputs.pth"))
    optimizer = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for _ in range(2):
        optimizer.zero_grad()
        (g(x) ** 2).mean().backward()
        optimizer.step()
    torch.save(g.state_dict(), os.path.join(args.out, "adam.pth"))


if __name__ == "__main__":
    main()

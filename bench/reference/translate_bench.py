"""PyTorch eager reference of the translation stage, for `adamcu bench translate --python`:
the same CycleGAN networks (tests/reference/cyclegan.py: the ResNet generator and the PatchGAN
as published) translating one image, one CycleGAN training iteration (both generators with
least-squares GAN, cycle and identity losses, then both discriminators on real and generated
images, Adam for each pair; batch 1), and FDA through torch.fft, with random weights and images.

    python3 translate_bench.py --size 1052x1914 --crop 256x256 --ngf 64 --blocks 9 --ndf 64 --layers 3
Prints one JSON line: images/s of each, and the device.
"""
import argparse, json, os, sys, time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
from cyclegan import discriminator, generator  # noqa: E402


def timed(call, images, iterations, device):
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images * iterations / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1052x1914")
    p.add_argument("--crop", default="256x256")
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--blocks", type=int, default=9)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    h, w = map(int, a.size.split("x"))
    ch, cw = map(int, a.crop.split("x"))
    g_a, g_b = generator(a.ngf, a.blocks).to(device), generator(a.ngf, a.blocks).to(device)
    d_a, d_b = discriminator(a.ndf, a.layers).to(device), discriminator(a.ndf, a.layers).to(device)
    image = torch.rand(1, 3, h, w, device=device) * 2 - 1
    with torch.no_grad():
        translate = timed(lambda: g_a(image), 1, a.iterations, device)

    opt_g = torch.optim.Adam(list(g_a.parameters()) + list(g_b.parameters()), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), lr=2e-4, betas=(0.5, 0.999))
    real_a = torch.rand(1, 3, ch, cw, device=device) * 2 - 1
    real_b = torch.rand(1, 3, ch, cw, device=device) * 2 - 1
    lsgan = lambda p, real: F.mse_loss(p, torch.ones_like(p) if real else torch.zeros_like(p))

    def iteration():
        for p in list(d_a.parameters()) + list(d_b.parameters()):
            p.requires_grad_(False)
        fake_b, fake_a = g_a(real_a), g_b(real_b)
        rec_a, rec_b = g_b(fake_b), g_a(fake_a)
        idt = (F.l1_loss(g_a(real_b), real_b) + F.l1_loss(g_b(real_a), real_a)) * 5.0
        loss_g = lsgan(d_a(fake_b), True) + lsgan(d_b(fake_a), True) + (F.l1_loss(rec_a, real_a) + F.l1_loss(rec_b, real_b)) * 10.0 + idt
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        for p in list(d_a.parameters()) + list(d_b.parameters()):
            p.requires_grad_(True)
        loss_d = (lsgan(d_a(real_b), True) + lsgan(d_a(fake_b.detach()), False)) * 0.5 \
            + (lsgan(d_b(real_a), True) + lsgan(d_b(fake_a.detach()), False)) * 0.5
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()

    train = timed(iteration, 2, a.iterations, device)
    target = torch.rand(1, 3, h, w, device=device)

    def fda():
        with torch.no_grad():
            s, t = torch.fft.rfft2(image), torch.fft.rfft2(target)
            amplitude, phase = s.abs(), s.angle()
            bh, bw = int(a.beta * h), int(a.beta * w)
            amplitude[..., : bh + 1, : bw + 1] = t.abs()[..., : bh + 1, : bw + 1]
            if bh > 0:
                amplitude[..., h - bh:, : bw + 1] = t.abs()[..., h - bh:, : bw + 1]
            torch.fft.irfft2(torch.polar(amplitude, phase), s=(h, w))

    print(json.dumps({"device": str(device), "translate_images_per_s": translate,
                      "train_images_per_s": train, "fda_images_per_s": timed(fda, 1, a.iterations, device)}))


if __name__ == "__main__":
    main()

#!/usr/bin/python3
# The PyTorch oracle for the training layers' tests (tests/core/train/layers_test.cc): Debian's
# python3-torch on the CPU, in float64. Run with /usr/bin/python3 (Debian's packages work only with
# that interpreter).
#   torch_oracle.py DIR
# DIR/case.json names the layer and its arguments; inputs are DIR/<name>.f32 (float32, the C++
# tensors' bytes) and DIR/target.u8; outputs go to DIR/<name>.f64 (float64).
import json
import sys

import numpy as np
import torch

d = sys.argv[1]
case = json.load(open(d + "/case.json"))


def load(name, shape):
    return torch.from_numpy(np.fromfile(f"{d}/{name}.f32", dtype=np.float32).astype(np.float64).reshape(shape))


def save(name, t):
    t.detach().numpy().astype(np.float64).ravel().tofile(f"{d}/{name}.f64")


kind = case["layer"]
if kind in ("conv3d", "tconv"):
    # Conv3d's weight is [cout, cin, k³], ConvTranspose3d's [cin, cout, k³] (PyTorch's layouts).
    x = load("x", case["x"]).requires_grad_(True)
    ci, co, k = case["cin"], case["cout"], case["k"]
    conv = torch.nn.functional.conv3d if kind == "conv3d" else torch.nn.functional.conv_transpose3d
    w = load("w", [co, ci, k, k, k] if kind == "conv3d" else [ci, co, k, k, k]).requires_grad_(True)
    b = load("b", [co]).requires_grad_(True)
    y = conv(x, w, b, stride=case["stride"], padding=case["pad"])
    dy = load("dy", list(y.shape))
    y.backward(dy)
    save("y", y), save("dx", x.grad), save("dw", w.grad), save("db", b.grad)
elif kind == "norm":
    x = load("x", case["x"]).requires_grad_(True)
    c = case["x"][1]
    g = load("gamma", [c]).requires_grad_(True)
    be = load("beta", [c]).requires_grad_(True)
    # InstanceNorm3d(affine=True) then LeakyReLU(0.01), as nnU-Net's conv blocks.
    z = torch.nn.functional.instance_norm(x, weight=g, bias=be, eps=case["eps"])
    y = torch.nn.functional.leaky_relu(z, case["slope"])
    dy = load("dy", list(y.shape))
    y.backward(dy)
    save("y", y), save("dx", x.grad), save("dgamma", g.grad), save("dbeta", be.grad)
elif kind == "loss":
    logits = load("logits", case["x"]).requires_grad_(True)
    n, classes = case["x"][0], case["x"][1]
    t = torch.from_numpy(np.fromfile(f"{d}/target.u8", dtype=np.uint8).astype(np.int64).reshape([n] + case["x"][2:]))
    ce = torch.nn.functional.cross_entropy(logits, t)
    p = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(t, classes).permute(0, 4, 1, 2, 3).to(torch.float64)
    s = case["smooth"]
    # nnU-Net's SoftDiceLoss with batch_dice=True, do_bg=False: sums over batch and space per class.
    axes = [0, 2, 3, 4]
    tp = (p * onehot).sum(axes)
    dc = (2 * tp + s) / (p.sum(axes) + onehot.sum(axes) + s)
    dice = dc[1:].mean()
    loss = ce - dice
    loss.backward()
    save("loss", torch.stack([loss, ce, dice])), save("dlogits", logits.grad)
elif kind in ("sgd", "adamw"):
    n, steps = case["n"], case["steps"]
    p = torch.nn.Parameter(load("p", [n]))
    grads = load("g", [steps, n])
    if kind == "sgd":
        opt = torch.optim.SGD([p], lr=case["lr"], momentum=case["momentum"], nesterov=case["nesterov"], weight_decay=case["wd"])
    else:
        opt = torch.optim.AdamW([p], lr=case["lr"], betas=(case["beta1"], case["beta2"]), eps=case["eps"], weight_decay=case["wd"])
    for i in range(steps):
        p.grad = grads[i].clone()
        opt.step()
    save("p", p)
elif kind == "unet_step":
    # The same network as tresor::train::UNet, written with torch.nn.functional over one flat
    # parameter vector in UNet::parameters()'s order; forward, nnU-Net's loss, backward, one
    # SGD step (Nesterov) — the whole training step.
    L, base, cap, cin, classes = case["levels"], case["base"], case["max"], case["in"], case["classes"]
    flat = torch.nn.Parameter(load("params", [case["count"]]))
    x = load("x", case["x"])
    at = [0]

    def take(*shape):
        n = 1
        for v in shape:
            n *= v
        t = flat[at[0]:at[0] + n].view(*shape)
        at[0] += n
        return t

    def width(s):
        return min(base << s, cap)

    def block(h, ci, co, stride):
        w, b = take(co, ci, 3, 3, 3), take(co)
        g, be = take(co), take(co)
        h = torch.nn.functional.conv3d(h, w, b, stride=stride, padding=1)
        h = torch.nn.functional.instance_norm(h, weight=g, bias=be, eps=1e-5)
        return torch.nn.functional.leaky_relu(h, 0.01)

    skips = []
    h, c = x, cin
    for s in range(L):
        h = block(h, c, width(s), 1 if s == 0 else 2)
        h = block(h, width(s), width(s), 1)
        skips.append(h)
        c = width(s)
    dec = {}  # decoder stage outputs by resolution level s
    for s in range(L - 2, -1, -1):
        w, b = take(width(s + 1), width(s), 2, 2, 2), take(width(s))
        h = torch.nn.functional.conv_transpose3d(h, w, b, stride=2)
        h = torch.cat((h, skips[s]), 1)
        h = block(h, 2 * width(s), width(s), 1)
        h = block(h, width(s), width(s), 1)
        dec[s] = h
    w, b = take(classes, width(0), 1, 1, 1), take(classes)
    logits = torch.nn.functional.conv3d(h, w, b)
    outputs = [logits]
    if case.get("ds"):
        # nnU-Net's deep supervision: a 1x1x1 head on the decoder stage at 1/2^j, j = 1 .. L-2.
        for j in range(1, L - 1):
            w, b = take(classes, width(j), 1, 1, 1), take(classes)
            outputs.append(torch.nn.functional.conv3d(dec[j], w, b))
    assert at[0] == case["count"], (at[0], case["count"])
    n = case["x"][0]
    t = torch.from_numpy(np.fromfile(f"{d}/target.u8", dtype=np.uint8).astype(np.int64).reshape([n] + case["x"][2:]))

    def dice_ce(lg, tt):
        ce = torch.nn.functional.cross_entropy(lg, tt)
        p = torch.softmax(lg, 1)
        onehot = torch.nn.functional.one_hot(tt, classes).permute(0, 4, 1, 2, 3).to(torch.float64)
        axes = [0, 2, 3, 4]
        tp = (p * onehot).sum(axes)
        dc = (2 * tp + 1e-5) / (p.sum(axes) + onehot.sum(axes) + 1e-5)
        return ce - dc[1:].mean()

    # nnU-Net's DeepSupervisionWrapper weights: 1/2^j, the lowest resolution 0, normalised;
    # targets downsampled nearest-exact.
    weights = np.array([1 / (2 ** j) for j in range(len(outputs))])
    if len(outputs) > 1:
        weights[-1] = 0
    weights = weights / weights.sum()
    loss = 0
    for j, out in enumerate(outputs):
        tj = t if j == 0 else torch.nn.functional.interpolate(t[:, None].double(), size=list(out.shape[2:]), mode="nearest-exact")[:, 0].long()
        if weights[j] != 0:
            loss = loss + weights[j] * dice_ce(out, tj)
    loss.backward()
    save("logits", logits), save("loss", loss.reshape(1)), save("grads", flat.grad)
    opt = torch.optim.SGD([flat], lr=case["lr"], momentum=0.99, nesterov=True, weight_decay=3e-5)
    opt.step()
    save("after", flat)
else:
    sys.exit("unknown layer " + kind)

//! SGD with momentum and weight decay (PyTorch's semantics: no dampening, the first step's
//! buffer is the gradient), per-group learning rates (10x for the heads) and a poly schedule.
//! tch's optimizer cannot save its state, so this one owns its momentum buffers and step.

use crate::model::deeplab::HEAD_PREFIXES;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

pub struct Sgd {
    /// Trainable variables by name, with their learning-rate multiplier.
    params: BTreeMap<String, (Tensor, f64)>,
    buffers: BTreeMap<String, Tensor>,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Steps taken so far.
    pub step: u64,
}

/// Poly learning rate: `base * (1 - step / total) ^ power`.
pub fn poly_lr(base: f64, step: u64, total: u64, power: f64) -> f64 {
    base * (1.0 - (step as f64 / total.max(1) as f64).min(1.0)).powf(power)
}

/// The trainable variables in name order: the optimizer's order, and the data-parallel
/// Reducer's (the same on every rank).
pub fn trainable_by_name(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect()
}

impl Sgd {
    pub fn new(vs: &VarStore, momentum: f64, weight_decay: f64, head_lr_mult: f64) -> Sgd {
        let params = trainable_by_name(vs)
            .into_iter()
            .map(|(name, t)| {
                let mult = if HEAD_PREFIXES.iter().any(|p| name.starts_with(p)) { head_lr_mult } else { 1.0 };
                (name, (t, mult))
            })
            .collect();
        Sgd { params, buffers: BTreeMap::new(), momentum, weight_decay, step: 0 }
    }

    pub fn lr_multiplier(&self, name: &str) -> Option<f64> {
        self.params.get(name).map(|(_, m)| *m)
    }

    /// Drops every gradient (set to none): the next backward writes fresh ones.
    pub fn zero_grad(&mut self) {
        let params: Vec<&Tensor> = self.params.values().map(|(t, _)| t).collect();
        crate::torch_ext::clear_grads(&params);
    }

    /// One update with base learning rate `lr`: per learning-rate group, a few multi-tensor
    /// kernels over the parameters that have a gradient.
    pub fn update(&mut self, lr: f64) {
        let mut groups: BTreeMap<u64, (Vec<Tensor>, Vec<Tensor>, f64)> = BTreeMap::new();
        for (name, (param, mult)) in &self.params {
            if !param.grad().defined() {
                continue;
            }
            // Zero before the first step: momentum * 0 + d is PyTorch's first-step copy of d.
            // Without momentum there are no buffers (the kernel ignores them).
            let buffer = if self.momentum == 0.0 {
                param
            } else {
                self.buffers.entry(name.clone()).or_insert_with(|| param.zeros_like().detach())
            };
            let group = groups.entry(mult.to_bits()).or_insert_with(|| (Vec::new(), Vec::new(), *mult));
            group.0.push(param.shallow_clone());
            group.1.push(buffer.shallow_clone());
        }
        for (params, buffers, mult) in groups.values() {
            let (p, b): (Vec<&Tensor>, Vec<&Tensor>) = (params.iter().collect(), buffers.iter().collect());
            crate::torch_ext::sgd_foreach(&p, &b, lr * mult, self.momentum, self.weight_decay)
                .unwrap_or_else(|e| panic!("SGD step: {e}"));
        }
        self.step += 1;
    }

    /// Momentum buffers (`momentum.<name>`) and the step (`step`), for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.buffers.iter().map(|(n, b)| (format!("momentum.{n}"), b.shallow_clone())).collect();
        out.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        out
    }

    pub fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.buffers.clear();
        let mut step = None;
        for (key, t) in tensors {
            if key == "step" {
                step = Some(t.to_kind(Kind::Int64).int64_value(&[0]) as u64);
            } else if let Some(name) = key.strip_prefix("momentum.") {
                let Some((param, _)) = self.params.get(name) else {
                    bail!("optimizer state has a buffer for {name}, which this model does not train");
                };
                if param.size() != t.size() {
                    bail!("optimizer buffer {name} has shape {:?}, the parameter {:?}", t.size(), param.size());
                }
                // In the parameter's memory layout (checkpoints store contiguous tensors; a
                // channels-last parameter with a contiguous buffer leaves the foreach fast path).
                let mut buffer = param.empty_like();
                tch::no_grad(|| buffer.copy_(t));
                self.buffers.insert(name.to_string(), buffer);
            }
        }
        self.step = step.ok_or_else(|| anyhow::anyhow!("optimizer state lacks its step"))?;
        Ok(())
    }
}

/// Adam as torch.optim.Adam computes it (no weight decay, no AMSGrad): the CycleGAN's
/// optimizer. Like `Sgd`, it owns its moments and step so that a checkpoint holds them.
pub struct Adam {
    params: BTreeMap<String, Tensor>,
    first: BTreeMap<String, Tensor>,
    second: BTreeMap<String, Tensor>,
    pub betas: (f64, f64),
    pub eps: f64,
    pub step: u64,
}

impl Adam {
    /// Adam over `params` (name, variable).
    pub fn new(params: Vec<(String, Tensor)>, betas: (f64, f64)) -> Adam {
        Adam {
            params: params.into_iter().collect(),
            first: BTreeMap::new(),
            second: BTreeMap::new(),
            betas,
            eps: 1e-8,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        let params: Vec<&Tensor> = self.params.values().collect();
        crate::torch_ext::clear_grads(&params);
    }

    /// One update at learning rate `lr` of every parameter that has a gradient:
    /// m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    /// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    pub fn update(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2) = self.betas;
        let t = self.step as i32;
        let (correction1, correction2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        tch::no_grad(|| {
            for (name, param) in &self.params {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let m = self.first.entry(name.clone()).or_insert_with(|| param.zeros_like());
                let v = self.second.entry(name.clone()).or_insert_with(|| param.zeros_like());
                let _ = m.lerp_(&grad, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2).addcmul_(&grad, &(&grad * (1.0 - b2)));
                let denom = v.sqrt() / correction2.sqrt() + self.eps;
                let mut param = param.shallow_clone();
                let _ = param.addcdiv_(&(&*m * (-lr / correction1)), &denom);
            }
        });
    }

    /// Moments (`m.<name>`, `v.<name>`) and the step, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for (prefix, moments) in [("m", &self.first), ("v", &self.second)] {
            out.extend(moments.iter().map(|(n, t)| (format!("{prefix}.{n}"), t.shallow_clone())));
        }
        out.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        out
    }

    pub fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        self.first.clear();
        self.second.clear();
        let mut step = None;
        for (key, t) in tensors {
            let (moments, name) = match key.split_once('.') {
                _ if key == "step" => {
                    step = Some(t.to_kind(Kind::Int64).int64_value(&[0]) as u64);
                    continue;
                }
                Some(("m", name)) => (&mut self.first, name),
                Some(("v", name)) => (&mut self.second, name),
                _ => bail!("optimizer state has an unknown entry {key}"),
            };
            let Some(param) = self.params.get(name) else {
                bail!("optimizer state has moments for {name}, which this model does not train");
            };
            if param.size() != t.size() {
                bail!("optimizer moment {key} has shape {:?}, the parameter {:?}", t.size(), param.size());
            }
            moments.insert(name.to_string(), t.to(param.device()).to_kind(param.kind()));
        }
        self.step = step.ok_or_else(|| anyhow::anyhow!("optimizer state lacks its step"))?;
        Ok(())
    }
}

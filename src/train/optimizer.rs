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

impl Sgd {
    pub fn new(vs: &VarStore, momentum: f64, weight_decay: f64, head_lr_mult: f64) -> Sgd {
        let params = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
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

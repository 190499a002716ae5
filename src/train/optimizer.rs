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
        let params = vs.variables().into_iter()
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

    pub fn zero_grad(&mut self) {
        for (t, _) in self.params.values_mut() {
            let mut grad = t.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// One update with base learning rate `lr`.
    pub fn update(&mut self, lr: f64) {
        tch::no_grad(|| {
            for (name, (param, mult)) in &self.params {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let d = if self.weight_decay != 0.0 { &grad + param * self.weight_decay } else { grad };
                let direction = match self.buffers.get_mut(name) {
                    Some(buffer) if self.momentum != 0.0 => {
                        let _ = buffer.g_mul_scalar_(self.momentum).g_add_(&d);
                        buffer.shallow_clone()
                    }
                    _ if self.momentum != 0.0 => {
                        let buffer = d.detach().copy();
                        self.buffers.insert(name.clone(), buffer.shallow_clone());
                        buffer
                    }
                    _ => d,
                };
                let _ = param.shallow_clone().g_add_(&(direction * (-lr * mult)));
            }
        });
        self.step += 1;
    }

    /// Momentum buffers (`momentum.<name>`) and the step (`step`), for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self.buffers.iter()
            .map(|(n, b)| (format!("momentum.{n}"), b.shallow_clone())).collect();
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
                self.buffers.insert(name.to_string(), t.to_device(param.device()).to_kind(param.kind()));
            }
        }
        self.step = step.ok_or_else(|| anyhow::anyhow!("optimizer state lacks its step"))?;
        Ok(())
    }
}

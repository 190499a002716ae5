//! The dynamic category correlation matrix (Eqs. 7-8): R(u,v) = M(u,v) / M(u), the share of
//! class-u pixels predicted as v (v != u; the diagonal is 0: a correct pixel is not a
//! confusion), folded into W by an EMA every iteration. Rows of classes absent from the
//! batch keep their value (M(u) = 0 leaves R(u, .) undefined).

use tch::{Device, Kind, Tensor};

pub struct Dccm {
    /// W, [C, C] on the device.
    pub w: Tensor,
    pub momentum: f64,
}

impl Dccm {
    pub fn new(classes: i64, momentum: f64, device: Device) -> Dccm {
        Dccm { w: Tensor::zeros([classes, classes], (Kind::Float, device)), momentum }
    }

    /// The batch's confusion counts M [C, C] f32 from labels and predictions (1-D, 255 = no
    /// label): what data-parallel ranks sum before `update_from_counts`.
    pub fn counts(labels: &Tensor, predictions: &Tensor, classes: i64) -> Tensor {
        crate::confusion::confusion_counts(labels, predictions, classes).to_kind(Kind::Float)
    }

    /// The batch's error rates R from labels and predictions (1-D, 255 = no label).
    pub fn error_rates(labels: &Tensor, predictions: &Tensor, classes: i64) -> (Tensor, Tensor) {
        Dccm::rates_of(Dccm::counts(labels, predictions, classes))
    }

    /// R and which classes were seen, from confusion counts M.
    fn rates_of(counts: Tensor) -> (Tensor, Tensor) {
        let classes = counts.size()[0];
        let totals = counts.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
        let eye = Tensor::eye(classes, (Kind::Float, counts.device()));
        let rates = counts * (1.0 - eye) / totals.clamp_min(1.0);
        (rates, totals.squeeze_dim(1).gt(0.0))
    }

    /// Eq. 8 for the rows seen in this batch.
    pub fn update(&mut self, labels: &Tensor, predictions: &Tensor) {
        let counts = Dccm::counts(labels, predictions, self.w.size()[0]);
        self.update_from_counts(counts);
    }

    /// Eq. 8 from the step's confusion counts M (summed over the ranks of a data-parallel job).
    pub fn update_from_counts(&mut self, counts: Tensor) {
        tch::no_grad(|| {
            let (rates, seen) = Dccm::rates_of(counts);
            let updated = &self.w * self.momentum + rates * (1.0 - self.momentum);
            self.w = updated.where_self(&seen.unsqueeze(1), &self.w);
        });
    }

    /// Logit weights for anchor classes `u` [U, Na] and key classes `v` [U, Nk] of U units:
    /// [U, Na, Nk] = 1 + W(u, v) (docs/algorithm.md: with W starting at 0, Eq. 10's bare W(u,v)
    /// would zero every logit). Classes outside 0..C (padding, ignore) get weight 1.
    pub fn weights_batched(&self, u: &Tensor, v: &Tensor) -> Tensor {
        let c = self.w.size()[0];
        let (units, na, nk) = (u.size()[0], u.size()[1], v.size()[1]);
        // 1 + W with an extra row and column of 1 where classes outside 0..C land: one gather
        // writes each of the U x Na x Nk weights (a mask and a select over them cost as much
        // again, every step).
        let table = self.w.constant_pad_nd([0, 1, 0, 1]) + 1.0;
        let rows = table.index_select(0, &u.clamp(0, c).flatten(0, -1)).view([units, na, c + 1]);
        rows.gather(2, &v.clamp(0, c).unsqueeze(1).expand([units, na, nk], false), false)
    }
}

//! The oracle: the only way target labels reach training. A target batch's labels travel
//! sealed in `SealedLabels`; `Oracle::reveal` returns a label only where the ledger shows
//! the pixel was bought, 255 (ignore) elsewhere.

use tch::Tensor;

/// Target labels of a batch, readable only through the oracle.
pub struct SealedLabels(Tensor);

impl SealedLabels {
    pub fn seal(labels: Tensor) -> SealedLabels {
        SealedLabels(labels)
    }
}

pub struct Oracle;

impl Oracle {
    /// Labels where `bought` is true, 255 elsewhere. `bought`: [B, H, W] bool on the labels' device.
    pub fn reveal(labels: &SealedLabels, bought: &Tensor) -> Tensor {
        crate::torch_ext::labels_on(&labels.0, bought.device()).where_scalarother(bought, 255i64)
    }
}

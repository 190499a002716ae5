//! Multi-level contrastive units (Section III-C) and their losses (Section III-D): anchors,
//! category centers, units at the intra-image, cross-image and cross-domain levels,
//! pixel-to-pixel and center-to-center InfoNCE, and the dynamic category correlation matrix.

pub mod dccm;
pub mod diagnostics;
pub mod infonce;
pub mod units;

//! Active labelling: the uncertainty score (Eqs. 1-3), the pixel groups and Algorithm 1's
//! budget control with adaptive sampling, the oracle that reveals bought target labels, and
//! the ledger that records every bought pixel; the round strategies (RIPU and the uncertainty
//! baselines) in `rounds`.

pub mod ledger;
pub mod oracle;
pub mod rounds;
pub mod sampling;
pub mod uncertainty;

//! Buck2's gRPC protocol (placeholder until the method descriptors land).

use crate::bench::Measurement;
use crate::{Failure, Options, Outcome};

pub fn run(_options: &Options) -> Result<Outcome, Failure> {
    Err(Failure::Usage(
        "buck2 mode is not available in this build".to_owned(),
    ))
}

pub fn bench(_options: &Options, _requests: usize) -> Result<Measurement, Failure> {
    Err(Failure::Usage(
        "buck2 mode is not available in this build".to_owned(),
    ))
}

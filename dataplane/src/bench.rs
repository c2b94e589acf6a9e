//! Placeholder replaced below.
use anyhow::Result;
#[derive(clap::Args)]
pub struct BenchArgs {}
pub fn run(_: BenchArgs) -> Result<()> {
    Ok(())
}

//! Compiles the libfabric shim (`csrc/ofi_shim.c`) when libfabric's headers are installed
//! (`libfabric-dev`); libfabric itself is loaded at run time. Without the headers the crate
//! builds without the RMA provider (cfg `cfs_ofi` unset) and falls back to TCP.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(cfs_ofi)");
    println!("cargo::rerun-if-changed=csrc/ofi_shim.c");
    // The directory: a header installed later keeps its package mtime, the directory does not.
    println!("cargo::rerun-if-changed=/usr/include/rdma");
    let include = std::env::var("CFS_OFI_INCLUDE").unwrap_or_else(|_| "/usr/include".into());
    println!("cargo::rerun-if-env-changed=CFS_OFI_INCLUDE");
    if !std::path::Path::new(&include)
        .join("rdma/fabric.h")
        .exists()
    {
        println!(
            "cargo::warning=libfabric headers not found under {include}: building without the RMA provider (apt-get install libfabric-dev)"
        );
        return;
    }
    cc::Build::new()
        .file("csrc/ofi_shim.c")
        .include(&include)
        .flag_if_supported("-Wall")
        .compile("cfs_ofi_shim");
    println!("cargo::rustc-link-lib=dl");
    println!("cargo::rustc-cfg=cfs_ofi");
}

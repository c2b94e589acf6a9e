//! `cfs-lincheck HISTORY`: checks a recorded history of register reads and writes for
//! linearizability (format in `cfs_sim::lincheck`); exit status 0 if it is linearizable, 1 if
//! not, 2 on a bad file.

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: cfs-lincheck HISTORY");
        std::process::exit(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cfs-lincheck: {path}: {e}");
            std::process::exit(2);
        }
    };
    let ops = match cfs_sim::lincheck::parse(&text) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cfs-lincheck: {path}: {e}");
            std::process::exit(2);
        }
    };
    let keys: std::collections::BTreeSet<&str> = ops.iter().map(|o| o.key.as_str()).collect();
    let unknown = ops.iter().filter(|o| o.ret.is_none()).count();
    match cfs_sim::lincheck::check(&ops) {
        Ok(()) => println!(
            "linearizable: {} operations on {} keys ({unknown} with unknown outcome)",
            ops.len(),
            keys.len()
        ),
        Err(e) => {
            println!("NOT linearizable: {e}");
            std::process::exit(1);
        }
    }
}

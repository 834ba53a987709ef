//! Writes a synthetic model pair and reports size and speed.
//!
//! `cargo run --release -p kibitz-synthetic-model --example write_pair -- DIR [tiny|full] [QUANT]`
//! (QUANT: Q4_K_M, Q8_0, F16, F32; full defaults to Q4_K_M, tiny to Q8_0).

use std::time::Instant;

use kibitz_synthetic_model::{write_pair_with_progress, Quant, Spec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: write_pair DIR [tiny|full] [Q4_K_M|Q8_0|F16|F32]");
        std::process::exit(2);
    };
    let quant = match args.get(2).map(|q| q.parse::<Quant>()).transpose() {
        Ok(quant) => quant,
        Err(e) => {
            eprintln!("write_pair: {e}");
            std::process::exit(2);
        }
    };
    let spec = match args.get(1).map(String::as_str) {
        None | Some("tiny") => Spec {
            quant: quant.unwrap_or(Quant::Q8_0),
            ..Spec::tiny()
        },
        Some("full") => Spec::minicpm_o_4_5(quant.unwrap_or(Quant::Q4_K_M)),
        Some(other) => {
            eprintln!("write_pair: unknown size '{other}' (tiny or full)");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let mut last_tenth = 0;
    let result = write_pair_with_progress(dir.as_ref(), &spec, &mut |done, total| {
        let tenth = done * 10 / total.max(1);
        if tenth > last_tenth {
            last_tenth = tenth;
            eprintln!(
                "{:>3}% {:>6.1} s",
                tenth * 10,
                start.elapsed().as_secs_f64()
            );
        }
    });
    let pair = match result {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("write_pair: {e}");
            std::process::exit(1);
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for path in [&pair.llm, &pair.mmproj] {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        total += len;
        println!("{:>14} bytes  {}", len, path.display());
    }
    println!(
        "{total:>14} bytes in {secs:.2} s = {:.0} MB/s",
        total as f64 / secs / 1e6
    );
}

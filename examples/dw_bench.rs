//! Depthwise kernel timing on MobileNetV2's and EfficientNet-Lite0's shapes (batch 32).
use std::time::Instant;

use sfr::engine::Act;
use sfr::engine::conv::{self, ConvGeom, Epilogue};

fn main() {
    let shapes: &[(usize, usize, usize, usize, &str)] = &[
        (32, 112, 3, 1, "mnv2 b1"),
        (96, 112, 3, 2, "mnv2 b2 s2"),
        (144, 56, 3, 1, "mnv2 b3"),
        (144, 56, 3, 2, "mnv2 b4 s2"),
        (192, 28, 3, 1, "mnv2 28"),
        (384, 14, 3, 1, "mnv2 14"),
        (960, 7, 3, 1, "mnv2 7"),
        (144, 56, 5, 2, "lite 5x5 s2"),
        (240, 28, 5, 1, "lite 5x5 28"),
        (672, 14, 5, 1, "lite 5x5 14"),
    ];
    let n = 32;
    let (mut tf, mut tb) = (0.0, 0.0);
    for &(c, h, k, s, name) in shapes {
        let p = k / 2;
        let g =
            ConvGeom::new([n, c, h, h], c, [k, k], [s, s], [(p, p), (p, p)], [1, 1], c).unwrap();
        let x: Vec<f32> = (0..g.n * g.in_len())
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..g.weight_len())
            .map(|i| (i % 7) as f32 / 7.0 - 0.5)
            .collect();
        let bias = vec![0.1f32; c];
        let mut y = vec![0.0f32; g.n * g.out_len()];
        let mut dx = vec![0.0f32; x.len()];
        let ep = Epilogue {
            bias: &bias,
            act: Act::Relu6,
            residual: None,
        };
        conv::forward(&g, &x, &w, &ep, &mut y);
        let reps = 5;
        let t0 = Instant::now();
        for _ in 0..reps {
            conv::forward(&g, &x, &w, &ep, &mut y);
        }
        let f = t0.elapsed().as_secs_f64() / reps as f64 * 1e3;
        let t0 = Instant::now();
        for _ in 0..reps {
            conv::backward_input(&g, &y, &w, &mut dx);
        }
        let b = t0.elapsed().as_secs_f64() / reps as f64 * 1e3;
        tf += f;
        tb += b;
        println!(
            "{name:14} c{c:4} {h:3}x{h:<3} k{k} s{s}: forward {f:7.2} ms  backward {b:7.2} ms   ({:.1} GB/s fwd)",
            (x.len() + y.len()) as f64 * 4.0 / f / 1e6
        );
    }
    println!("total forward {tf:.1} ms, backward {tb:.1} ms");
}

//! Every zoo architecture against PyTorch on fixed inputs with fixed (random, full-size) weights
//! made by `tools/zoo_reference.py`: logits and the first two sites must match.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use sfr::zoo::{self, Tap};

/// Records the sites it is asked for.
struct Record {
    want: Vec<String>,
    got: HashMap<String, (Vec<usize>, Vec<f32>)>,
    order: Vec<String>,
}

impl Tap for Record {
    fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
        self.order.push(site.to_string());
        if self.want.iter().any(|w| w == site) {
            let dims = x.dims().to_vec();
            let v = x
                .clone()
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32 site");
            self.got.insert(site.to_string(), (dims, v));
        }
        x
    }
}

fn check(arch: &str, reference: &str) {
    let Some(dir) = common::zoo_reference() else {
        return;
    };
    let dev = sfr::device::default_device();
    let weights = dir.join(format!("{reference}.safetensors"));
    let model = zoo::load(arch, &weights, &dev).unwrap_or_else(|e| panic!("{arch}: {e}"));
    let io = sfr::weights::load(&dir.join(format!("{reference}_io.safetensors"))).expect("io file");
    let meta =
        sfr::weights::read_safetensors_metadata(&dir.join(format!("{reference}_io.safetensors")))
            .expect("io metadata");
    let input = io.get("input").expect("input");
    let logits = io.get("logits").expect("logits");
    let s = &input.shape;
    let x: Tensor<4> = Tensor::from_data(
        TensorData::new(input.data.clone(), [s[0], s[1], s[2], s[3]]),
        &dev,
    );
    let sites: Vec<String> = meta["sites"].split(',').map(String::from).collect();
    let mut rec = Record {
        want: sites.clone(),
        got: HashMap::new(),
        order: Vec::new(),
    };
    let y = model
        .forward_normalized(x, &mut rec)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32");
    let d = common::max_abs_diff(&y, &logits.data);
    eprintln!(
        "{arch}: max |logits - torch| = {d:.2e} (input {}x{})",
        s[2], s[3]
    );
    assert!(d < 1e-3, "{arch}: logits differ from PyTorch by {d}");
    // Without a tap every unit runs fused (folded batch norm, activation, residual): the
    // same logits.
    let fused = model
        .forward_normalized(
            Tensor::from_data(
                TensorData::new(input.data.clone(), [s[0], s[1], s[2], s[3]]),
                &dev,
            ),
            &mut zoo::NoTap,
        )
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32");
    let df = common::max_abs_diff(&fused, &logits.data);
    eprintln!("{arch}: fused max |logits - torch| = {df:.2e}");
    assert!(
        df < 1e-3,
        "{arch}: fused logits differ from PyTorch by {df}"
    );
    // The tap saw every site, in the order the model declares them, the first ones first.
    let declared: Vec<String> = model.sites().into_iter().map(|s| s.name).collect();
    assert_eq!(
        rec.order, declared,
        "{arch}: tap order differs from Model::sites()"
    );
    assert_eq!(
        &rec.order[..2],
        &sites[..],
        "{arch}: first sites differ from PyTorch's forward order"
    );
    for site in &sites {
        let (dims, v) = &rec.got[site];
        let r = io.get(&format!("site.{site}")).expect("site tensor");
        assert_eq!(dims, &r.shape, "{arch}: site {site} shape");
        let ds = common::max_abs_diff(v, &r.data);
        let scale = r.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        assert!(
            ds / scale < 1e-4,
            "{arch}: site {site} differs by {ds} (scale {scale})"
        );
    }
}

#[test]
fn mobilenet_v2_matches_torchvision() {
    check("mobilenet_v2", "mobilenet_v2");
}

#[test]
fn alexnet_matches_torchvision() {
    check("alexnet", "alexnet");
}

#[test]
fn vgg16_matches_torchvision() {
    check("vgg16", "vgg16");
}

#[test]
fn googlenet_matches_torchvision_with_transform_input() {
    check("googlenet", "googlenet_ti");
}

#[test]
fn resnet18_matches_torchvision() {
    check("resnet18", "resnet18");
}

#[test]
fn resnet50_matches_torchvision() {
    check("resnet50", "resnet50");
}

#[test]
fn resnet152_matches_torchvision() {
    check("resnet152", "resnet152");
}

#[test]
fn efficientnet_lites_match_the_package_model() {
    for i in 0..5 {
        let name = format!("efficientnet_lite{i}");
        check(&name, &name);
    }
}

#[test]
fn caffenet_matches_caffe_definition_in_pytorch() {
    check("caffenet", "caffenet");
}

#[test]
fn vgg_f_matches_caffe_definition_in_pytorch() {
    check("vgg_f", "vgg_f");
}

/// A tap can change what the network computes at a site, and identity changes nothing.
#[test]
fn tap_changes_a_site() {
    let Some(dir) = common::zoo_reference() else {
        return;
    };
    let dev = sfr::device::default_device();
    let model = zoo::load("resnet18", &dir.join("resnet18.safetensors"), &dev).expect("load");
    let x: Tensor<4> = Tensor::random(
        [2, 3, 64, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let base = model
        .forward_normalized(x.clone(), &mut zoo::NoTap)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();

    struct Zero(&'static str, usize);
    impl Tap for Zero {
        fn visit(&mut self, site: &str, x: Tensor<4>) -> Tensor<4> {
            if site == self.0 {
                self.1 += 1;
                x.zeros_like()
            } else {
                x
            }
        }
    }
    let mut z = Zero("layer1.0.conv1", 0);
    let changed = model
        .forward_normalized(x.clone(), &mut z)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    assert_eq!(z.1, 1, "the site was visited once");
    assert!(
        common::max_abs_diff(&base, &changed) > 1e-3,
        "zeroing a site must change the logits"
    );
    let again = model
        .forward_normalized(x, &mut zoo::NoTap)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    assert_eq!(base, again, "forward is deterministic");
    let _ = Path::new(".");
}

/// The site rule on every zoo family: at most 6 sites in forward order, the stem first, then
/// every conv but the depthwise ones and the 1×1 expansions, none skipped before the last pick;
/// on MobileNetV2, the EfficientNet-Lite family, ResNet-18, AlexNet, CaffeNet and VGG-F it gives
/// their hand placements (on the last two, the paper's release). Prints both placements per family.
#[test]
fn site_rule_places_early_convs_on_every_family() {
    let Some(dir) = common::zoo_reference() else {
        return;
    };
    let dev = sfr::device::default_device();
    for spec in zoo::specs() {
        let name = spec.name.to_string();
        let weights = dir.join(format!("{name}.safetensors"));
        let model = zoo::load(&name, &weights, &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rule = sfr::defense::rule_sites(&model).unwrap();
        let hand = sfr::defense::hand_sites(&model);
        eprintln!("{name}: rule {rule:?}; hand {hand:?}");
        let sites = model.sites();
        let max = sfr::defense::RULE_MAX_SITES;
        assert_eq!(rule.len(), max.min(sites.len()), "{name}: {rule:?}");
        assert_eq!(rule[0], sites[0].name, "{name}: the stem first");
        assert_eq!(
            model.order_sites(&rule).unwrap(),
            rule,
            "{name}: forward order"
        );
        // Early: after the stem, a site is picked exactly when the rule does not skip it, up to
        // the last pick.
        let last = sites
            .iter()
            .position(|s| s.name == *rule.last().unwrap())
            .unwrap();
        for s in &sites[1..=last] {
            assert_eq!(
                rule.contains(&s.name),
                !sfr::defense::rule_skips(s),
                "{name}: {} ({} → {}, kernel {:?}, groups {})",
                s.name,
                s.in_channels,
                s.out_channels,
                s.kernel,
                s.groups
            );
        }
        if name == "mobilenet_v2"
            || name.starts_with("efficientnet_lite")
            || ["resnet18", "alexnet", "caffenet", "vgg_f"].contains(&name.as_str())
        {
            assert_eq!(
                Some(rule.clone()),
                hand,
                "{name}: the rule is the hand placement"
            );
        }
        // `--sites rule` names the rule; no --sites, the hand placement.
        assert_eq!(
            sfr::defense::resolve_sites(&model, &["rule".to_string()]).unwrap(),
            rule
        );
        assert_eq!(
            sfr::defense::resolve_sites(&model, &[]).unwrap(),
            hand.unwrap_or(rule)
        );
    }
}

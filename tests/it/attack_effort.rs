//! `best`'s effort: every budget times the effort, one probe per unit of effort from its own
//! random start, and the default (effort 1) unchanged, so the files it made still resume.

use std::path::Path;

use brittle::attack::plan::{Plan, MAX_EFFORT};
use brittle::attack::AttackKind;
use brittle::norm::Norm;
use brittle::util::OptionError;

fn best(norm: Norm, effort: usize) -> Plan {
    Plan::new(AttackKind::Best, norm, None, 9, 10, effort).unwrap()
}

/// `(pass name, steps, once_found)` of every pass.
fn budgets(plan: &Plan) -> Vec<(&'static str, usize, usize)> {
    plan.passes
        .iter()
        .map(|p| {
            let b = p.budget();
            (b.name, b.steps, b.once_found)
        })
        .collect()
}

#[test]
fn effort_multiplies_every_budget_and_adds_probes() {
    for norm in [Norm::Linf, Norm::L2] {
        let one = budgets(&best(norm, 1));
        for effort in [2, 3] {
            let plan = best(norm, effort);
            let scaled = budgets(&plan);
            let probes = scaled.iter().filter(|b| b.0 == "probe").count();
            assert_eq!(probes, effort, "{norm} effort {effort}: {scaled:?}");
            let others: Vec<_> = scaled.iter().filter(|b| b.0 != "probe").collect();
            let base: Vec<_> = one.iter().filter(|b| b.0 != "probe").collect();
            assert_eq!(others.len(), base.len());
            for (s, b) in others.iter().zip(&base) {
                assert_eq!(s.0, b.0);
                assert_eq!(s.1, b.1 * effort, "{s:?} vs {b:?}");
                assert_eq!(s.2, b.2 * effort, "{s:?} vs {b:?}");
            }
            let restarts = (1..effort)
                .map(|k| format!("restart: {k}"))
                .filter(|r| plan.describe().contains(r.as_str()))
                .count();
            assert_eq!(restarts, effort - 1, "{}", plan.describe());
        }
    }
}

#[test]
fn effort_is_refused_where_it_means_nothing_or_overflows() {
    let field = |kind, steps, effort| {
        let e = Plan::new(kind, Norm::Linf, steps, 9, 10, effort)
            .err()
            .unwrap();
        e.downcast_ref::<OptionError>().unwrap().field
    };
    assert_eq!(field(AttackKind::Best, None, 0), "effort");
    assert_eq!(field(AttackKind::Best, None, MAX_EFFORT + 1), "effort");
    assert_eq!(field(AttackKind::Best, Some(usize::MAX / 2), 3), "steps");
    assert_eq!(field(AttackKind::Fmn, None, 2), "effort");
    assert_eq!(field(AttackKind::Fab, None, 3), "effort");
    assert!(Plan::new(AttackKind::Best, Norm::L2, None, 9, 10, MAX_EFFORT).is_ok());
}

/// The committed `docs/results` files were made by the default `best`: its description must not
/// change unless they are made again (`scripts/results.py`), or they no longer resume.
#[test]
fn the_default_is_the_plan_of_the_committed_results() {
    let meta =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/results/resnet_2b/margins.csv.meta.json");
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    assert_eq!(side["settings"]["attack"], "best");
    assert_eq!(side["settings"]["norm"], "linf");
    assert!(side["settings"].get("effort").is_none());
    assert_eq!(
        side["plan"].as_str().unwrap(),
        best(Norm::Linf, 1).describe()
    );
    assert!(!best(Norm::Linf, 1).describe().contains("restart"));
}

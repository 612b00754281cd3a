//! `blind-index` and `search-terms`: searchable-field values for the value on stdin.

use phiseal_proto::v1::{
    BlindIndexRequest, BlindIndexSpec, Context, DeterministicTerms, Normalization,
    SearchTermsRequest, search_terms_request,
};
use serde_json::json;

use crate::cli::{BlindIndexArgs, GlobalArgs, IndexSpecArgs, SearchTermsArgs};
use crate::client::Daemon;
use crate::error::CliError;
use crate::field::read_value;
use crate::output::report;

fn context(tenant: &str, field: &str) -> Context {
    Context {
        tenant: tenant.to_owned(),
        field: field.to_owned(),
        record: None,
    }
}

/// The spec named on the command line; both parts are required.
fn spec(args: &IndexSpecArgs) -> Result<BlindIndexSpec, CliError> {
    let (Some(name), Some(bits)) = (&args.normalization, args.bits) else {
        return Err(CliError::Usage(
            "give --normalization (exact, case-folded, digits-only) and --bits (16..=256, a \
             multiple of 8), as when the index was written"
                .into(),
        ));
    };
    let normalization = match name.as_str() {
        "exact" => Normalization::Exact,
        "case-folded" => Normalization::CaseFolded,
        _ => Normalization::DigitsOnly,
    };
    Ok(BlindIndexSpec {
        normalization: normalization as i32,
        bits,
    })
}

/// `blind-index`.
pub(crate) async fn blind_index(args: BlindIndexArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let spec = spec(&args.spec)?;
    let mut value = read_value()?;
    let daemon = Daemon::connect(global).await?;
    let request = BlindIndexRequest {
        context: Some(context(&args.tenant, &args.field)),
        value: std::mem::take(&mut *value),
        spec: Some(spec),
    };
    let term = daemon
        .call("blind index", daemon.field().blind_index(request))
        .await?
        .term
        .ok_or_else(|| CliError::Failed("blind index: the daemon sent no index".into()))?;
    let index = hex::encode(&term.value);
    report(
        global.json,
        &json!({ "key_version": term.key_version, "index_hex": index }),
        &index,
    )
}

/// `search-terms`.
pub(crate) async fn search_terms(
    args: SearchTermsArgs,
    global: &GlobalArgs,
) -> Result<(), CliError> {
    let kind = if args.deterministic {
        search_terms_request::Kind::Deterministic(DeterministicTerms {})
    } else {
        search_terms_request::Kind::BlindIndex(spec(&args.spec)?)
    };
    let mut value = read_value()?;
    let daemon = Daemon::connect(global).await?;
    let request = SearchTermsRequest {
        context: Some(context(&args.tenant, &args.field)),
        value: std::mem::take(&mut *value),
        kind: Some(kind),
    };
    let terms = daemon
        .call("search terms", daemon.field().search_terms(request))
        .await?
        .terms;
    let shown: Vec<(u32, String)> = terms
        .iter()
        .map(|t| {
            let value = if args.deterministic {
                phiseal::format::to_text(&t.value)
            } else {
                hex::encode(&t.value)
            };
            (t.key_version, value)
        })
        .collect();
    let value = json!({
        "terms": shown
            .iter()
            .map(|(v, t)| json!({ "key_version": v, "value": t }))
            .collect::<Vec<_>>()
    });
    let human: Vec<&str> = shown.iter().map(|(_, t)| t.as_str()).collect();
    report(global.json, &value, &human.join("\n"))
}

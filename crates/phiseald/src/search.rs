//! The searchable-field RPCs: `EncryptDeterministic`, `BlindIndex`, `SearchTerms`
//! (`docs/SEARCH.md`). Same shape as the unary field RPCs: admit, parse, authorize, run on
//! the keyring, reply; plaintexts and looked-up values are wiped on every path.

use phiseal::audit::Action;
use phiseal::{BlindIndexSpec, Normalization};
use phiseal_proto::v1 as pb;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::policy::Operation;
use phiseal::EncryptionContext;

use crate::service::{Call, Sidecar, key_version_of, parse_context};
use crate::status;

fn term(t: phiseal::SearchTerm) -> pb::SearchTerm {
    pb::SearchTerm {
        key_version: t.key_version,
        value: t.value,
    }
}

/// The blind-index spec of a request; INVALID_ARGUMENT names what is wrong.
fn spec(spec: Option<&pb::BlindIndexSpec>) -> Result<BlindIndexSpec, Status> {
    let spec = spec.ok_or_else(|| {
        status::from_error(&phiseal::Error::InvalidInput {
            what: "spec",
            reason: "missing: give a normalization and a number of bits",
        })
    })?;
    let normalization = match pb::Normalization::try_from(spec.normalization) {
        Ok(pb::Normalization::Exact) => Normalization::Exact,
        Ok(pb::Normalization::CaseFolded) => Normalization::CaseFolded,
        Ok(pb::Normalization::DigitsOnly) => Normalization::DigitsOnly,
        Ok(pb::Normalization::Unspecified) | Err(_) => {
            return Err(status::from_error(&phiseal::Error::InvalidInput {
                what: "spec.normalization",
                reason: "must be EXACT, CASE_FOLDED or DIGITS_ONLY",
            }));
        }
    };
    BlindIndexSpec::new(normalization, spec.bits).map_err(|e| status::from_error(&e))
}

impl Sidecar {
    /// The shape of these RPCs: take the secret value out of the request (wiped on every
    /// path), admit the caller, parse the context, run `work` (which authorizes) within the
    /// deadline, reply.
    async fn search_call<B, R>(
        &self,
        rpc: &'static str,
        action: Action,
        mut request: Request<B>,
        split: fn(&mut B) -> (Option<pb::Context>, Vec<u8>),
        work: impl AsyncFnOnce(&Call, EncryptionContext, &[u8], B) -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        let (context, value) = split(request.get_mut());
        let value = Zeroizing::new(value);
        let call = self.admit_as(rpc, action, &request).await?;
        let result = self
            .within(&call, async {
                let context =
                    parse_context(context.as_ref()).map_err(|e| status::from_error(&e))?;
                work(&call, context, &value, request.into_inner()).await
            })
            .await;
        self.reply(&call, result)
    }

    /// `EncryptDeterministic`.
    pub(crate) async fn encrypt_deterministic(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let split =
            |b: &mut pb::EncryptRequest| (b.context.take(), std::mem::take(&mut b.plaintext));
        self.search_call(
            "EncryptDeterministic",
            Action::EncryptDeterministic,
            request,
            split,
            async |call, context, plaintext, _| {
                // Equal values give equal ciphertexts: whoever may write them can compare
                // values with a deterministic column, so they need `search` as well (as
                // deterministic `SearchTerms` need `encrypt`). Authorized first, as every
                // call: a caller without the grant is refused (and audited) as such.
                for operation in [Operation::Encrypt, Operation::Search] {
                    self.authorize_field_as(
                        call,
                        operation,
                        Action::EncryptDeterministic,
                        &context,
                    )
                    .await?;
                }
                self.check_answer_size(std::iter::once(plaintext.len()))?;
                let ciphertext = self
                    .inline(
                        self.keyring
                            .encrypt_deterministic(&call.caller, &context, plaintext),
                    )
                    .await?
                    .map_err(|e| status::from_error(&e))?;
                Ok(pb::EncryptResponse {
                    key_version: key_version_of(&ciphertext),
                    ciphertext,
                })
            },
        )
        .await
    }

    /// `BlindIndex`.
    pub(crate) async fn blind_index(
        &self,
        request: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        let split =
            |b: &mut pb::BlindIndexRequest| (b.context.take(), std::mem::take(&mut b.value));
        self.search_call(
            "BlindIndex",
            Action::BlindIndex,
            request,
            split,
            async |call, context, value, body| {
                self.authorize_field_as(call, Operation::Search, Action::BlindIndex, &context)
                    .await?;
                let spec = spec(body.spec.as_ref())?;
                let index = self
                    .inline(
                        self.keyring
                            .blind_index(&call.caller, &context, value, &spec),
                    )
                    .await?
                    .map_err(|e| status::from_error(&e))?;
                Ok(pb::BlindIndexResponse {
                    term: Some(term(index)),
                })
            },
        )
        .await
    }

    /// `SearchTerms`.
    pub(crate) async fn search_terms(
        &self,
        request: Request<pb::SearchTermsRequest>,
    ) -> Result<Response<pb::SearchTermsResponse>, Status> {
        use pb::search_terms_request::Kind;
        let split =
            |b: &mut pb::SearchTermsRequest| (b.context.take(), std::mem::take(&mut b.value));
        // The action an unauthenticated call is audited under (a call without a kind is
        // refused later, as invalid).
        let refused_as = match request.get_ref().kind {
            Some(Kind::Deterministic(_)) => Action::DeterministicQuery,
            _ => Action::BlindIndexQuery,
        };
        self.search_call(
            "SearchTerms",
            refused_as,
            request,
            split,
            async |call, context, value, body| {
                let (action, requested) = match &body.kind {
                    Some(Kind::Deterministic(_)) => (Action::DeterministicQuery, None),
                    Some(Kind::BlindIndex(s)) => (Action::BlindIndexQuery, Some(s)),
                    None => {
                        return Err(status::from_error(&phiseal::Error::InvalidInput {
                            what: "kind",
                            reason: "missing: deterministic or blind_index",
                        }));
                    }
                };
                self.authorize_field_as(call, Operation::Search, action, &context)
                    .await?;
                let spec = requested.map(|s| spec(Some(s))).transpose()?;
                if spec.is_none() {
                    // Deterministic terms are valid ciphertexts of a chosen value: whoever may
                    // ask for them could write them, so they need `encrypt` as well.
                    self.authorize_field_as(call, Operation::Encrypt, action, &context)
                        .await?;
                }
                let terms = match &spec {
                    None => {
                        self.inline(
                            self.keyring
                                .deterministic_query(&call.caller, &context, value),
                        )
                        .await?
                    }
                    Some(spec) => {
                        self.inline(self.keyring.blind_index_query(
                            &call.caller,
                            &context,
                            value,
                            spec,
                        ))
                        .await?
                    }
                }
                .map_err(|e| status::from_error(&e))?;
                // One term per live key version: how many there are is known only now (the
                // work is done and audited), but the caller still gets a clear refusal rather
                // than gRPC's bare OUT_OF_RANGE.
                self.check_answer_size(terms.iter().map(|t| t.value.len()))?;
                Ok(pb::SearchTermsResponse {
                    terms: terms.into_iter().map(term).collect(),
                })
            },
        )
        .await
    }
}

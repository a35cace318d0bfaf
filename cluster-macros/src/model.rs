//! The annotated items, parsed: `main`'s arguments, signature and body (shared statements, the
//! role blocks, the `#[on(..)]` handlers), and a message type with its arguments.
//!
//! Parsing takes the body apart and reports what cannot be read (`#[on(nonsense)]`,
//! `#[primary(a, b)]`); whether the parts make a valid `main` (one block per role, async
//! handlers, ...) is `validate`'s question.

use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use quote::quote;
use syn::spanned::Spanned;
use syn::{Attribute, Block, Error, Generics, Ident, Item, ItemFn, Signature, Stmt};

use crate::args::{self, MainArgs, MessageArgs};
use crate::errors::{Errors, Failure};

/// Which branch a block is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Worker,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Worker => "worker",
        }
    }
}

/// The events an `#[on(..)]` handler may take: the variants of `cluster::Event`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Fork,
    Online,
    Listening,
    Disconnect,
    Exit,
    Message,
    Error,
    Setup,
}

impl Event {
    const ALL: [Event; 8] = [
        Event::Fork,
        Event::Online,
        Event::Listening,
        Event::Disconnect,
        Event::Exit,
        Event::Message,
        Event::Error,
        Event::Setup,
    ];

    /// The name in `#[on(..)]`, the variant of `Event`, and the fields passed to the handler
    /// after the primary handle, in call order.
    fn spec(self) -> (&'static str, &'static str, &'static [&'static str]) {
        match self {
            Event::Fork => ("fork", "Fork", &["worker"]),
            Event::Online => ("online", "Online", &["worker"]),
            Event::Listening => ("listening", "Listening", &["worker", "address"]),
            Event::Disconnect => ("disconnect", "Disconnect", &["worker"]),
            Event::Exit => ("exit", "Exit", &["worker", "status"]),
            Event::Message => ("message", "Message", &["worker", "msg"]),
            Event::Error => ("error", "Error", &["worker", "error"]),
            Event::Setup => ("setup", "Setup", &["settings"]),
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().0
    }

    pub fn variant(self) -> &'static str {
        self.spec().1
    }

    pub fn fields(self) -> &'static [&'static str] {
        self.spec().2
    }

    fn expected() -> String {
        Self::ALL
            .iter()
            .map(|e| format!("`{}`", e.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An `#[on(event)] fn` of a role block; the function stays in the block's statements.
pub struct Handler {
    pub event: Event,
    /// The event's name in `#[on(..)]`: the event's fields are passed with its span, so a
    /// handler whose parameters do not fit shows which event they should fit.
    pub event_span: Span,
    /// The `on` of `#[on(..)]`.
    pub on_span: Span,
    pub sig: Signature,
    /// The index of the function in the block's statements.
    pub stmt: usize,
}

/// One `#[primary(name)] { .. }` or `#[worker(name)] { .. }` block.
pub struct Branch {
    pub role: Role,
    /// The path of the role attribute: `primary` in `#[primary(cluster)]`.
    pub role_span: Span,
    /// A second role attribute on the same block, as in `#[primary] #[worker] { .. }`.
    pub also: Option<(Role, Span)>,
    pub binding: Option<Ident>,
    /// The block's statements, the handlers' functions without their `#[on(..)]`.
    pub block: Block,
    pub handlers: Vec<Handler>,
}

/// A statement of `main`'s body: shared code or a role block.
pub enum Part {
    Shared(Box<Stmt>),
    Branch(Box<Branch>),
}

/// `main` taken apart: its attributes and signature, and its body's statements.
pub struct Body {
    /// The function, its statements moved into `parts`.
    pub func: ItemFn,
    pub parts: Vec<Part>,
}

/// The parsed input of `#[cluster::main]`.
pub struct MainInput {
    pub args: MainArgs,
    pub body: Body,
    /// Kept apart from the body's errors: with the arguments alone wrong, the body is still
    /// expanded.
    pub arg_errors: Errors,
    pub body_errors: Errors,
}

impl MainInput {
    /// Fails only when the item is not a function; then nothing else is parsed.
    pub fn parse(args: TokenStream, item: TokenStream) -> Result<Self, Failure> {
        let func: ItemFn = match syn::parse2(item.clone()) {
            Ok(f) => f,
            Err(error) => {
                return Err(Failure {
                    error,
                    tokens: item,
                });
            }
        };
        let mut arg_errors = Errors::default();
        let args = args::parse_main(args, &mut arg_errors);
        let mut body_errors = Errors::default();
        let body = Body::parse(func, &mut body_errors);
        Ok(MainInput {
            args,
            body,
            arg_errors,
            body_errors,
        })
    }
}

/// Recognises `#[primary]`, `#[primary(name)]`, `#[worker]` and `#[worker(name)]`.
fn role_attr(attrs: &[Attribute]) -> Option<(usize, Role)> {
    attrs.iter().enumerate().find_map(|(i, a)| {
        if a.path().is_ident("primary") {
            Some((i, Role::Primary))
        } else if a.path().is_ident("worker") {
            Some((i, Role::Worker))
        } else {
            None
        }
    })
}

fn binding(attr: &Attribute, role: Role) -> syn::Result<Option<Ident>> {
    match &attr.meta {
        syn::Meta::Path(_) => Ok(None),
        syn::Meta::List(l) => l.parse_args::<Ident>().map(Some).map_err(|_| {
            let msg = format!(
                "expected one name for the {0} handle, as in `#[{0}(handle)]`",
                role.name()
            );
            if l.tokens.is_empty() {
                Error::new(l.delimiter.span().join(), msg)
            } else {
                Error::new_spanned(&l.tokens, msg)
            }
        }),
        syn::Meta::NameValue(nv) => Err(Error::new_spanned(
            nv,
            format!("expected `#[{0}]` or `#[{0}(handle)]`", role.name()),
        )),
    }
}

impl Body {
    fn parse(mut func: ItemFn, errors: &mut Errors) -> Body {
        let stmts = std::mem::take(&mut func.block.stmts);
        let parts = stmts
            .into_iter()
            .map(|stmt| match stmt {
                Stmt::Expr(syn::Expr::Block(eb), semi) => match role_attr(&eb.attrs) {
                    Some((i, role)) => Part::Branch(Box::new(Branch::parse(eb, i, role, errors))),
                    None => Part::Shared(Box::new(Stmt::Expr(syn::Expr::Block(eb), semi))),
                },
                stmt => Part::Shared(Box::new(stmt)),
            })
            .collect();
        Body { func, parts }
    }
}

impl Branch {
    /// `eb` is a block whose attribute `i` is the role attribute.
    fn parse(mut eb: syn::ExprBlock, i: usize, role: Role, errors: &mut Errors) -> Branch {
        let attr = eb.attrs.remove(i);
        let also = role_attr(&eb.attrs).map(|(j, again)| {
            let again_attr = eb.attrs.remove(j);
            (again, again_attr.path().span())
        });
        let binding = binding(&attr, role).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let mut block = eb.block;
        let handlers = take_handlers(&mut block, errors);
        Branch {
            role,
            role_span: attr.path().span(),
            also,
            binding,
            block,
            handlers,
        }
    }
}

/// Takes `#[on(event)]` off the functions of a block and records them as handlers.
fn take_handlers(block: &mut Block, errors: &mut Errors) -> Vec<Handler> {
    let mut handlers = Vec::new();
    for (stmt, item) in block.stmts.iter_mut().enumerate() {
        let Stmt::Item(Item::Fn(f)) = item else {
            continue;
        };
        let Some(i) = f.attrs.iter().position(|a| a.path().is_ident("on")) else {
            continue;
        };
        let attr = f.attrs.remove(i);
        let ev = match attr.parse_args::<Ident>() {
            Ok(ev) => ev,
            Err(_) => {
                errors.push(Error::new_spanned(
                    &attr.meta,
                    format!(
                        "expected `#[on(event)]` with one event: one of {}",
                        Event::expected()
                    ),
                ));
                continue;
            }
        };
        let Some(event) = Event::ALL.into_iter().find(|e| ev == e.name()) else {
            errors.push(Error::new(
                ev.span(),
                format!(
                    "unknown event `{ev}`; expected one of {}",
                    Event::expected()
                ),
            ));
            continue;
        };
        handlers.push(Handler {
            event,
            event_span: ev.span(),
            on_span: attr.path().span(),
            sig: f.sig.clone(),
            stmt,
        });
    }
    handlers
}

/// The parsed input of `#[cluster::message]`.
pub struct MessageInput {
    pub args: MessageArgs,
    pub item: Item,
    pub ident: Ident,
    pub generics: Generics,
    pub arg_errors: Errors,
}

impl MessageInput {
    /// Fails when the item is not an `enum` or a `struct`; then nothing else is parsed.
    pub fn parse(args: TokenStream, item: TokenStream) -> Result<Self, Failure> {
        let parsed: Item = match syn::parse2(item.clone()) {
            Ok(i) => i,
            Err(error) => {
                return Err(Failure {
                    error,
                    tokens: item,
                });
            }
        };
        let (ident, generics) = match &parsed {
            Item::Enum(e) => (e.ident.clone(), e.generics.clone()),
            Item::Struct(s) => (s.ident.clone(), s.generics.clone()),
            other => {
                let error = Error::new_spanned(
                    head(other),
                    "`#[cluster::message]` goes on an `enum` or a `struct`; define the message \
                     as one",
                );
                return Err(Failure {
                    error,
                    tokens: item,
                });
            }
        };
        let mut arg_errors = Errors::default();
        let args = args::parse_message(args, &mut arg_errors);
        Ok(MessageInput {
            args,
            item: parsed,
            ident,
            generics,
            arg_errors,
        })
    }
}

/// The tokens of an item before its body, as `pub fn name(..) -> T` or `union U`: the span
/// of an error about the kind of item.
fn head(item: &Item) -> TokenStream {
    let mut out = TokenStream::new();
    let mut tokens = quote!(#item).into_iter().peekable();
    // Skip the outer attributes: `#` and its `[..]`.
    while matches!(tokens.peek(), Some(TokenTree::Punct(p)) if p.as_char() == '#') {
        tokens.next();
        tokens.next();
    }
    for tt in tokens {
        match &tt {
            TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => break,
            TokenTree::Punct(p) if p.as_char() == ';' || p.as_char() == '=' => break,
            _ => out.extend([tt]),
        }
    }
    out
}

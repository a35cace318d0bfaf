//! Expansion of `#[cluster::main]`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::{Expr, Ident, Item, Stmt};

use crate::args::{MainArgs, Scheduling, Workers};
use crate::errors::{Failure, Invalid};
use crate::model::{Body, Branch, Part, Role};
use crate::paths::Krate;
use crate::validate::{Main, MainRecovery};

/// The errors, then `main` expanded with defaults for the wrong arguments, or a stub.
pub fn recover(invalid: Invalid<MainRecovery>) -> Failure {
    let tokens = match invalid.recovery {
        MainRecovery::Defaults(main) => expand(&main),
        MainRecovery::Stub(body) => stub(&body),
    };
    Failure {
        error: invalid.error,
        tokens,
    }
}

// Input:
//   #[cluster::main(workers = 2)] async fn main() { a; #[primary(c)] { fn x() {} b } }
// Output:
//   #[allow(dead_code)] fn main() { fn x() {} }
//
// A `fn main` with the user's name and attributes, so the user does not also see "`main`
// function not found", holding the items of the body (handlers, `use` declarations, helper
// functions), so that what the body uses is not also reported as unused.
fn stub(body: &Body) -> TokenStream {
    fn items(stmts: &[Stmt]) -> impl Iterator<Item = &Item> {
        stmts.iter().filter_map(|s| match s {
            Stmt::Item(item) => Some(item),
            _ => None,
        })
    }
    let mut kept: Vec<Item> = Vec::new();
    for part in &body.parts {
        match part {
            Part::Shared(stmt) => match &**stmt {
                Stmt::Item(item) => kept.push(item.clone()),
                Stmt::Expr(Expr::Block(b), _) => kept.extend(items(&b.block.stmts).cloned()),
                _ => {}
            },
            Part::Branch(b) => kept.extend(items(&b.block.stmts).cloned()),
        }
    }
    // A stray `#[on(..)]` outside a role block; its error is rustc's on the real expansion.
    for item in &mut kept {
        if let Item::Fn(f) = item {
            f.attrs.retain(|a| !a.path().is_ident("on"));
        }
    }
    let func = &body.func;
    let attrs = &func.attrs;
    let vis = &func.vis;
    let ident = &func.sig.ident;
    quote! {
        #(#attrs)*
        #[allow(dead_code)]
        #vis fn #ident() {
            #(#kept)*
        }
    }
}

// Input:
//   #[cluster::main(workers = 4, messages(to_primary = P))]
//   async fn main() -> R { shared; #[primary(cluster)] { .. } #[worker(worker)] { .. } tail }
// Output:
//   fn main() -> R {
//       use ::cluster as __cluster;
//       async fn __cluster_main(mut ctx: Context<P, ()>) -> R {
//           shared;
//           if let Some(cluster) = ctx.take_primary() { .. handlers' dispatch loop .. }
//           if let Some(worker) = ctx.take_worker() { .. }
//           tail
//       }
//       run::<P, (), _, _>(Config { workers: Workers::Count(4), .. }, __cluster_main)
//   }
pub fn expand(main: &Main) -> TokenStream {
    let args = &main.args;
    let (import, krate) = Krate(args.krate.clone()).import();
    let ctx = Ident::new("__cluster_ctx", Span::mixed_site());
    let inner = Ident::new("__cluster_main", Span::mixed_site());
    let unit = quote!(());
    let p_ty = args
        .to_primary
        .as_ref()
        .map_or(unit.clone(), |t| quote!(#t));
    let w_ty = args.to_worker.as_ref().map_or(unit, |t| quote!(#t));

    let body = main.body.parts.iter().map(|part| match part {
        Part::Shared(stmt) => quote!(#stmt),
        Part::Branch(b) => branch(&krate, &ctx, b),
    });

    let config = config(&krate, args);
    let run = krate.run();
    let context = krate.context();
    let func = &main.body.func;
    let attrs = &func.attrs;
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let output = &func.sig.output;
    quote! {
        #(#attrs)*
        #vis fn #ident() #output {
            #import
            #[allow(unused_mut, clippy::needless_return)]
            async fn #inner(mut #ctx: #context<#p_ty, #w_ty>) #output {
                #(#body)*
            }
            #run::<#p_ty, #w_ty, _, _>(#config, #inner)
        }
    }
}

// Input:  workers = 4, scheduling = "shared"
// Output: Config { workers: Workers::Count(4), scheduling: SchedulingPolicy::Shared, ..default() }
//
// The variants carry the span of the user's value, so a lint about one (a deprecated policy)
// points at the argument.
fn config(krate: &Krate, args: &MainArgs) -> TokenStream {
    let cfg = krate.config();
    let workers_path = krate.workers();
    let sched = krate.scheduling();
    let workers = match &args.workers {
        Some(w) => match w.value {
            Workers::Count(n) => quote_spanned!(w.span=> #workers_path::Count(#n)),
            Workers::Auto => quote_spanned!(w.span=> #workers_path::Auto),
        },
        None => quote!(#workers_path::Auto),
    };
    let scheduling = match &args.scheduling {
        Some(s) => {
            let variant = match s.value {
                Scheduling::RoundRobin => format_ident!("RoundRobin", span = s.span),
                Scheduling::Shared => format_ident!("Shared", span = s.span),
                Scheduling::ReusePort => format_ident!("ReusePort", span = s.span),
            };
            quote!(#sched::#variant)
        }
        None => quote!(#sched::RoundRobin),
    };
    quote! {
        #cfg { workers: #workers, scheduling: #scheduling, ..::core::default::Default::default() }
    }
}

// Input:  #[primary(cluster)] { stmts; #[on(exit)] async fn on_exit(..) {} }
// Output: if let Option::Some(cluster) = ctx.take_primary() {
//             stmts; #[allow(clippy::unused_async)] async fn on_exit(..) {}
//             while let Some(ev) = cluster.next_event().await { .. }   // with handlers only
//         }
fn branch(krate: &Krate, ctx: &Ident, b: &Branch) -> TokenStream {
    let option = krate.option();
    let take = match b.role {
        Role::Primary => format_ident!("take_primary"),
        Role::Worker => format_ident!("take_worker"),
    };
    let needs_name = !b.handlers.is_empty();
    let binding = match &b.binding {
        Some(id) => quote!(#id),
        None if needs_name => {
            let id = Ident::new("__cluster_primary", Span::mixed_site());
            quote!(#id)
        }
        None => quote!(_),
    };
    // Handlers must be `async` to be awaited by the loop, even those that await nothing.
    let stmts: Vec<TokenStream> = b
        .block
        .stmts
        .iter()
        .enumerate()
        .map(|(i, stmt)| {
            if b.handlers.iter().any(|h| h.stmt == i) {
                quote!(#[allow(clippy::unused_async)] #stmt)
            } else {
                quote!(#stmt)
            }
        })
        .collect();
    if !needs_name {
        return quote! {
            if let #option::Some(#binding) = #ctx.#take() {
                #(#stmts)*
            }
        };
    }
    // The loop follows the user's statements in the same block, so the handlers stay in scope;
    // a trailing expression (of type `()`, as the block's value is discarded) needs a `;` then.
    let trailing = matches!(b.block.stmts.last(), Some(Stmt::Expr(_, None)));
    let semi = trailing.then(|| quote!(;));
    let dispatch = dispatch(krate, &binding, b);
    quote! {
        if let #option::Some(#binding) = #ctx.#take() {
            #(#stmts)*
            #semi
            #dispatch
        }
    }
}

// Input:  #[on(exit)] async fn on_exit(..)
// Output: while let Some(ev) = cluster.next_event().await {
//             match ev {
//                 Event::Exit { worker: w, status: s, .. } => {
//                     HandlerOutput::report(on_exit(&cluster, w, s).await, "on_exit");
//                 }
//                 _ => {}
//             }
//         }
//
// Each call carries the handler's span and each argument the span of the event's name in
// `#[on(..)]`, so a handler whose parameters do not fit its event is an error on the handler
// that points at the event.
fn dispatch(krate: &Krate, primary: &TokenStream, b: &Branch) -> TokenStream {
    let event = krate.event();
    let output = krate.handler_output();
    let ev = Ident::new("__cluster_event", Span::mixed_site());
    let arms = b.handlers.iter().map(|h| {
        let variant = Ident::new(h.event.variant(), Span::call_site());
        let fields = h.event.fields();
        let names: Vec<Ident> = fields
            .iter()
            .map(|f| Ident::new(f, Span::call_site()))
            .collect();
        let at_event = Span::mixed_site().located_at(h.event_span);
        let locals: Vec<Ident> = fields
            .iter()
            .map(|f| Ident::new(&format!("__cluster_{f}"), at_event))
            .collect();
        let f = &h.sig.ident;
        let fname = f.to_string();
        let call = quote_spanned! {f.span()=>
            #output::report(#f(&#primary, #(#locals),*).await, #fname)
        };
        quote! {
            #event::#variant { #(#names: #locals,)* .. } => { #call; }
        }
    });
    quote! {
        while let ::core::option::Option::Some(#ev) = #primary.next_event().await {
            #[allow(unreachable_patterns)]
            match #ev {
                #(#arms)*
                _ => {}
            }
        }
    }
}

using System.Diagnostics.Metrics;
using Eplb.Balancing;
using Eplb.Migration;
using Eplb.Placement;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>
/// What <c>services.AddEplb(...)</c> returns (in <c>Microsoft.Extensions.DependencyInjection</c>, like the
/// extension and .NET's other <c>AddX</c> builders): adds the transport EPLB moves weights over and the
/// host's own placement policies. The container then owns the runtime: it creates
/// <see cref="EplbState"/> on first use (options validated, the policy resolved from the container's
/// <see cref="PlacementPolicyCatalog"/>) and disposes it, then the transport, when it is disposed.
/// </summary>
/// <example>
/// <code>
/// builder.Services.AddEplb(builder.Configuration.GetSection("Eplb"))
///     .AddInProcessTransport(ranks: 4)
///     .AddPlacementPolicy&lt;MyPolicy&gt;("mine");
/// var eplb = host.Services.GetRequiredService&lt;EplbState&gt;();
/// </code>
/// </example>
public sealed class EplbBuilder
{
    private EplbBuilder(IServiceCollection services, OptionsBuilder<EplbOptions> options)
    {
        Services = services;
        Options = options;
    }

    /// <summary>The service collection EPLB is registered in.</summary>
    public IServiceCollection Services { get; }

    /// <summary>The options' builder, for further configuration or validation.</summary>
    public OptionsBuilder<EplbOptions> Options { get; }

    /// <summary>
    /// Hosts every rank in this process (<see cref="InProcessTransport"/>, tests and simulations):
    /// weights move by buffer copies. Replaces a transport added before.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="ranks"/> is below 1.</exception>
    public EplbBuilder AddInProcessTransport(int ranks)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        return AddTransport(_ => new InProcessTransport(ranks));
    }

    /// <summary>
    /// One rank per process over NCCL (<see cref="NcclTransport"/>, created on first use on the
    /// current CUDA device). The NCCL environment rule (docs/design.md §3.4) is applied first, from
    /// the options (EPLB enabled, async) and the settings (data parallelism, all-to-all and MoE
    /// backends). Replaces a transport added before.
    /// </summary>
    /// <param name="settings">
    /// The rank, the ranks and the unique id, read when the transport is created (so the id can come
    /// from a service that exchanges it between processes).
    /// </param>
    public EplbBuilder AddNcclTransport(Func<IServiceProvider, NcclTransportSettings> settings)
    {
        ArgumentNullException.ThrowIfNull(settings);
        return AddTransport(provider =>
        {
            var given = settings(provider) ?? throw new InvalidOperationException("the NCCL transport settings factory returned null");
            var options = provider.GetRequiredService<IOptions<EplbOptions>>().Value;
            return new NcclTransport(given.UniqueId, given.Rank, given.Ranks, given.Environment(options),
                provider.GetService<ILoggerFactory>()?.CreateLogger<NcclTransport>());
        });
    }

    /// <summary>As <see cref="AddNcclTransport(Func{IServiceProvider, NcclTransportSettings})"/> with settings known now.</summary>
    public EplbBuilder AddNcclTransport(NcclTransportSettings settings)
    {
        ArgumentNullException.ThrowIfNull(settings);
        return AddNcclTransport(_ => settings);
    }

    /// <summary>Any other transport, created on first use and disposed by the container. Replaces a transport added before.</summary>
    public EplbBuilder AddTransport(Func<IServiceProvider, IExpertTransport> factory)
    {
        ArgumentNullException.ThrowIfNull(factory);
        Services.RemoveAll<IExpertTransport>();
        Services.AddSingleton(factory);
        return this;
    }

    /// <summary>
    /// Adds a placement policy under <paramref name="name"/> (case-insensitive, not one of the
    /// built-in names), created by the container (its constructor may take services) when the
    /// catalog is first used; <c>EplbOptions.Policy</c> may then name it.
    /// </summary>
    /// <exception cref="ArgumentException">The name is empty; a name given twice or taken by a built-in policy fails when the catalog is created.</exception>
    public EplbBuilder AddPlacementPolicy<TPolicy>(string name) where TPolicy : class, IPlacementPolicy
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        Services.TryAddSingleton<TPolicy>();
        Services.AddSingleton(new PolicyRegistration(name, typeof(TPolicy)));
        return this;
    }

    // The registrations every AddEplb makes (the second call adds nothing twice).
    internal static EplbBuilder Register(IServiceCollection services, OptionsBuilder<EplbOptions> options)
    {
        options.ValidateOnStart();
        services.TryAddSingleton(Catalog);
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<EplbOptions>, EplbOptionsValidator>(
            provider => new EplbOptionsValidator(provider.GetRequiredService<PlacementPolicyCatalog>())));
        services.TryAddSingleton(State);
        return new EplbBuilder(services, options);
    }

    // The built-in policies, then the added ones in the order they were added.
    private static PlacementPolicyCatalog Catalog(IServiceProvider provider)
    {
        var builtIn = PlacementPolicies.Default.Names.Select(name => KeyValuePair.Create(name, PlacementPolicies.Default.Get(name)));
        var added = provider.GetServices<PolicyRegistration>()
            .Select(r => KeyValuePair.Create(r.Name, (IPlacementPolicy)provider.GetRequiredService(r.Type)));
        return new PlacementPolicyCatalog(builtIn.Concat(added));
    }

    private static EplbState State(IServiceProvider provider)
    {
        var transport = provider.GetService<IExpertTransport>() ?? throw new InvalidOperationException(
            "EPLB has no transport: call AddInProcessTransport(ranks), AddNcclTransport(...) or AddTransport(...) on the builder AddEplb returns");
        return new EplbState(provider.GetRequiredService<IOptions<EplbOptions>>().Value, transport, provider.GetService<ILogger<EplbState>>(),
            provider.GetRequiredService<PlacementPolicyCatalog>(), provider.GetService<IMeterFactory>());
    }

    private sealed record PolicyRegistration(string Name, Type Type);
}

using Eplb.Balancing;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Options;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>
/// Registers Eplb with a .NET host. In <c>Microsoft.Extensions.DependencyInjection</c> by the .NET
/// convention for <c>AddX</c> extensions (so <c>services.AddEplb</c> needs no extra using); the one
/// files of managed/ whose namespace is not their folder's, with <see cref="EplbBuilder"/>.
/// </summary>
public static class EplbServiceCollectionExtensions
{
    /// <summary>
    /// Binds <see cref="EplbOptions"/> to <paramref name="configuration"/> (e.g. the "Eplb" section of
    /// appsettings.json, environment variables <c>Eplb__WindowSize</c>, command-line
    /// <c>--Eplb:WindowSize</c>), validates them when the host starts (one exception listing every
    /// violation), and registers the EPLB runtime: the placement policies
    /// (<see cref="Eplb.Placement.PlacementPolicyCatalog"/>: the built-in ones and those added with
    /// <see cref="EplbBuilder.AddPlacementPolicy{TPolicy}"/>) and <see cref="EplbState"/>, created on
    /// first use over the transport the returned builder adds, and disposed by the container.
    /// </summary>
    /// <returns>The builder that adds the transport and custom policies.</returns>
    public static EplbBuilder AddEplb(this IServiceCollection services, IConfiguration configuration)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configuration);
        return EplbBuilder.Register(services, services.AddOptions<EplbOptions>().Bind(configuration));
    }

    /// <summary>As <see cref="AddEplb(IServiceCollection, IConfiguration)"/>, with the options configured in code (validated the same way).</summary>
    public static EplbBuilder AddEplb(this IServiceCollection services, Action<EplbOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configure);
        return EplbBuilder.Register(services, services.AddOptions<EplbOptions>().Configure(configure));
    }
}

using Eplb.Balancing;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Options;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>
/// Registers Eplb with a .NET host. In <c>Microsoft.Extensions.DependencyInjection</c> by the .NET
/// convention for <c>AddX</c> extensions (so <c>services.AddEplb</c> needs no extra using); the one
/// file of managed/ whose namespace is not its folder's.
/// </summary>
public static class EplbServiceCollectionExtensions
{
    /// <summary>
    /// Binds <see cref="EplbOptions"/> to <paramref name="configuration"/> (e.g. the "Eplb" section of
    /// appsettings.json, environment variables <c>Eplb__WindowSize</c>, command-line
    /// <c>--Eplb:WindowSize</c>), validates them when the host starts (one exception listing every
    /// violation) and registers the validator.
    /// </summary>
    public static OptionsBuilder<EplbOptions> AddEplb(this IServiceCollection services, IConfiguration configuration)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configuration);
        services.AddSingleton<IValidateOptions<EplbOptions>, EplbOptionsValidator>();
        return services.AddOptions<EplbOptions>().Bind(configuration).ValidateOnStart();
    }

    /// <summary>Registers EPLB options configured in code, validated the same way.</summary>
    public static OptionsBuilder<EplbOptions> AddEplb(this IServiceCollection services, Action<EplbOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configure);
        services.AddSingleton<IValidateOptions<EplbOptions>, EplbOptionsValidator>();
        return services.AddOptions<EplbOptions>().Configure(configure).ValidateOnStart();
    }
}
